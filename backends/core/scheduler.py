"""Batch scheduling policy for one engine (pure policy: no model, no clock).

Queues, in order: `waiting` (FCFS, prefill not yet run) -> `running` (decoding). A step is
either a prefill batch (waiting prompts admitted FCFS under the token budget L_m, the batch
size cap and free KV blocks) or a decode step over every running sequence. Prefill goes first
when anything can be admitted, as in vLLM. When decode needs a block and none is free, the
most recently admitted sequence is preempted: its blocks are freed and it re-enters `waiting`
at the front, to be recomputed (prompt + tokens so far) later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backends.core.kv_cache import BlockManager
from backends.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64                  # decode batch cap (and prefill batch cap)
    max_num_batched_tokens: int = 4096      # prefill token budget per batch (L_m)
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Batch:
    is_prefill: bool
    seqs: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        if not self.is_prefill:
            return len(self.seqs)
        return sum(s.num_tokens - s.num_cached for s in self.seqs)


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
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        batch = self._schedule_decode()
        return batch if batch.seqs else None

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.config.block_size) - len(seq.block_ids))

    def _schedule_prefill(self) -> Batch:
        batch = Batch(is_prefill=True, seqs=[])
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch.seqs) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = seq.num_tokens - seq.num_cached
            if batch.seqs and num_new > budget:
                break                       # a lone long prompt still runs, alone
            need = self._blocks_needed(seq, seq.num_tokens)
            if not self.blocks.can_allocate(need):
                break
            seq.block_ids += self.blocks.allocate(need)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.seqs.append(seq)
            budget -= num_new
        self.running += batch.seqs
        return batch

    def _schedule_decode(self) -> Batch:
        batch = Batch(is_prefill=False, seqs=[])
        for seq in list(self.running):
            if seq not in self.running:     # preempted while making room for an earlier one
                continue
            while not self.blocks.can_allocate(self._blocks_needed(seq, seq.num_tokens)):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running:
                seq.block_ids += self.blocks.allocate(self._blocks_needed(seq, seq.num_tokens))
                batch.seqs.append(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids, seq.num_cached = [], 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

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
