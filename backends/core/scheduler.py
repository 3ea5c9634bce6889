"""Batch scheduling policy for one engine (pure policy: no model, no clock).

Queues, in order: `waiting` (FCFS, prefill not yet run) -> `running` (prefilled or being
prefilled, decoding). Two policies:

- Default (vLLM's original): a step is either a prefill batch (waiting prompts admitted FCFS
  under the token budget L_m, the batch size cap and free KV blocks) or a decode step over
  every running sequence. Prefill goes first when anything can be admitted, so new prompts
  pre-empt the decode batch for a step.
- Chunked prefill (Sarathi-Serve / vLLM v1): every step is one mixed batch under the token
  budget. Running sequences go first, in admission order: each decoding sequence adds its one
  token, a partly prefilled prompt its next chunk; then waiting prompts are admitted, the last
  one possibly with only a first chunk. A sequence keeps its blocks and `num_cached` between
  chunks and yields its first token only when its last chunk has run.

In both, when a running sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it re-enters `waiting` at the front, to be
recomputed (prompt + tokens so far) later.

The scheduler owns every state change: `schedule()` admits, reserves and preempts; `update()`
applies a step's result (cached tokens, sampled tokens, finish, and, on a prefill engine, the
PREFILLED hand-off state); `admit_prefilled()` / `start_decoding()` take a sequence whose KV
comes from elsewhere (WAITING_FOR_KV until its blocks are in). The engine and the simulator
drive these same calls; the model runner only computes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.core.kv_cache import BlockManager
from backends.core.sequence import FinishReason, Sequence, SequenceStatus

StopRule = Callable[[Sequence, int], "FinishReason | None"]    # (sequence, new token) -> why it ends


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64                  # decode batch cap (and prefill batch cap)
    max_num_batched_tokens: int = 4096      # token budget per prefill batch (L_m), or per step if chunked
    block_size: int = 16
    chunked_prefill: bool = False
    hand_off: bool = False                  # a prefill engine: a sequence stops after its first token

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.chunked_prefill and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"with chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_num_seqs ({self.max_num_seqs}): every running "
                             "sequence's decode token must fit in one step")


@dataclass
class Batch:
    """One step's work, decodes first: `seqs[:num_decodes]` add one token each; the others
    prefill `num_new[i]` tokens from their `num_cached` on. A sequence whose step reaches its
    last token (`is_sampled`) gets a new token; a prompt chunk that does not, none."""
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    is_sampled: list[bool] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(num_new)
        self.is_sampled.append(seq.num_cached + num_new == seq.num_tokens)

    @property
    def is_prefill(self) -> bool:
        return self.num_decodes == 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [s for s, is_sampled in zip(self.seqs, self.is_sampled) if is_sampled]

    def decodes_first(self) -> Batch:
        """Reorder so single-token rows (decodes) lead; they take the batched decode kernel."""
        order = sorted(range(len(self.seqs)), key=lambda i: self.num_new[i] != 1)
        self.seqs = [self.seqs[i] for i in order]
        self.num_new = [self.num_new[i] for i in order]
        self.is_sampled = [self.is_sampled[i] for i in order]
        self.num_decodes = self.num_new.count(1)
        return self


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        if self.config.chunked_prefill:
            batch = self._schedule_chunked()
        else:
            batch = self._schedule_prefill()
            if not batch.seqs:
                batch = self._schedule_decode()
        return batch if batch.seqs else None

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.config.block_size) - len(seq.block_ids))

    def _schedule_prefill(self) -> Batch:
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch.seqs) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = seq.num_tokens - seq.num_cached
            if batch.seqs and num_new > budget:
                break                       # a lone long prompt still runs, alone
            if not self._admit(seq, num_new):
                break
            batch.add(seq, num_new)
            budget -= num_new
        self.running += batch.seqs
        return batch

    def _schedule_decode(self) -> Batch:
        batch = Batch()
        for seq in list(self.running):
            if seq in self.running and self._reserve(seq, seq.num_tokens, batch):
                batch.add(seq, 1)
        batch.num_decodes = len(batch.seqs)
        return batch

    def _schedule_chunked(self) -> Batch:
        # `running` is in admission order and only its last sequence can be part-way through
        # its prompt (admission stops where the budget ends), so the decodes come first and,
        # with budget >= max_num_seqs, always fit.
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            num_new = min(seq.num_tokens - seq.num_cached, budget)
            if seq in self.running and num_new and self._reserve(seq, seq.num_cached + num_new, batch):
                batch.add(seq, num_new)
                budget -= num_new
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_tokens - seq.num_cached, budget)
            if not self._admit(seq, num_new):
                break
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch.decodes_first()

    def _admit(self, seq: Sequence, num_new: int) -> bool:
        """Move the head of `waiting` out, with blocks for `num_new` more tokens, if they are free."""
        need = self._blocks_needed(seq, seq.num_cached + num_new)
        if not self.blocks.can_allocate(need):
            return False
        seq.block_ids += self.blocks.allocate(need)
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        return True

    def _reserve(self, seq: Sequence, num_tokens: int, batch: Batch) -> bool:
        """Blocks for `num_tokens` of a running sequence, preempting from the back of `running`
        (never a sequence already in `batch`: those come earlier). False if `seq` itself went."""
        while not self.blocks.can_allocate(self._blocks_needed(seq, num_tokens)):
            victim = self.running[-1]
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        seq.block_ids += self.blocks.allocate(self._blocks_needed(seq, num_tokens))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids, seq.num_cached = [], 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # -- state changes after a step, and the disaggregation hand-off ----------------------------
    def update(self, batch: Batch, token_ids: list[int], stop: StopRule
               ) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Apply a step: every row's new tokens are cached; each sampled row gets its token and
        finishes if `stop` says so, or (hand_off) leaves `running` as PREFILLED with its blocks
        held. Returns (sequence, token, finish reason) per sampled row, in batch order."""
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_cached += n
        out = []
        for seq, token_id in zip(batch.sampled_seqs, token_ids):
            seq.append_token(token_id)
            reason = stop(seq, token_id)
            if reason is not None:
                seq.finish_reason = reason
                self.finish(seq)
            elif self.config.hand_off:
                self.running.remove(seq)                # KV stays allocated for hand-off
                seq.status = SequenceStatus.PREFILLED
            out.append((seq, token_id, reason))
        return out

    def can_admit(self, num_blocks: int) -> bool:
        return self.blocks.can_allocate(num_blocks) and len(self.running) < self.config.max_num_seqs

    def admit_prefilled(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Blocks for a sequence whose prompt KV is computed elsewhere: WAITING_FOR_KV until
        `start_decoding`. Raises MemoryError if they are not free."""
        seq.block_ids = self.blocks.allocate(num_blocks)
        seq.status = SequenceStatus.WAITING_FOR_KV
        return list(seq.block_ids)

    def start_decoding(self, seq: Sequence) -> None:
        """Its KV is in: the sequence joins the decode batch at the next step."""
        if seq.status != SequenceStatus.WAITING_FOR_KV:
            raise ValueError(f"request {seq.req_id!r} is not waiting for KV")
        seq.num_cached = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_ids:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
