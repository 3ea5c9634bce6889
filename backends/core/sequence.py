"""Request state as it moves through an engine.

WAITING -> (prefill) -> RUNNING -> FINISHED on one engine; in the disaggregated system a
prefill instance ends a sequence at PREFILLED (KV kept for hand-off) and a decode instance
starts it at WAITING_FOR_KV until the blocks have been copied in.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from backends.core.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREFILLED = "prefilled"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass(eq=False)        # compared by identity: the scheduler's `in` / `remove` stay cheap
class Sequence:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_cached: int = 0                 # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = 0.0                   # when it reached this engine (the caller's clock)
    scheduled_time: float | None = None         # its first step on this engine (schedule(now))
    # when its first output token came out: prefilled elsewhere, its arrival here; prefilled
    # here, the start of the step after (schedule(now)); the clock of its TPOT (router slack)
    first_token_time: float | None = None
    # prefix cache (prefix_cache.py): the chain hash of each full block of its tokens so far,
    # and the cache's node of each of its leading blocks that are cached (or equal to one)
    block_hashes: list[bytes] = field(default_factory=list)
    block_nodes: list[int] = field(default_factory=list)
    # len(prompt_ids) + len(output_ids), kept by append_token: the scheduler reads it several
    # times per row per step (tokens are only ever appended through append_token)
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.req_id}: prompt is empty")
        self.params = self.params.with_seed()
        self.num_tokens = len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.num_tokens += 1

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without copying the whole sequence (a decode needs one token)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:stop - n]
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
