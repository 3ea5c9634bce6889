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

With a prefix cache (the block manager's, prefix_cache.py), a prompt admitted from `waiting`
starts with its longest cached prefix of full blocks, shared, as `num_cached` tokens (at least
its last token is computed), and `update()` registers every block a step filled (prompt chunks,
generated tokens, accepted drafts), so preempted sequences and later prompts find them.

The scheduler owns every state change: `schedule()` admits, reserves and preempts; `update()`
applies a step's result (cached tokens, sampled tokens, finish, and, on a prefill engine, the
PREFILLED hand-off state). A sequence whose prompt KV is computed elsewhere (a decode instance)
enters with `add_remote()` as WAITING_FOR_KV; `admit_remote()` is the admission policy (FIFO,
while blocks and batch slots last) and hands back the sequences whose KV to fetch now; the KV
copy runs beside the steps, and `kv_arrived()` lets a sequence join the batch at the next step.
The engine and the simulator drive these same calls; the model runner only computes.

Speculative decoding (spec_decode.py): `schedule(drafts=...)` attaches a proposal to a decode
row after the batch is built, from what the step has left (token budget, free blocks; a draft
never preempts), so the row carries 1 + k tokens; `update_accepted()` appends the accepted
run, counts only accepted tokens as cached and frees the blocks held only for rejected ones.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backends.core.kv_cache import BlockManager
from backends.core.limits import EngineLimits
from backends.core.sequence import FinishReason, Sequence, SequenceStatus
from backends.core.tpot_slack import EXPECT_TTL_S, Expected


@dataclass
class Batch:
    """One step's work, decodes first: `seqs[:num_decodes]` add one token each; the others
    prefill `num_new[i]` tokens from their `num_cached` on. A sequence whose step reaches its
    last token (`is_sampled`) gets a new token; a prompt chunk that does not, none. A verify
    row (a sequence in `drafts`) runs its last token plus its draft: num_new = 1 + len(draft)."""
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    is_sampled: list[bool] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)
    copies: list[tuple[int, int]] = field(default_factory=list)    # (src, dst) blocks to copy first

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
    """`hand_off`: a prefill engine (a sequence stops after its first token, KV kept).
    A sequence finishes on a stop token, an EOS in `eos_token_ids` (unless ignore_eos), its
    max_tokens, or the context length `max_model_len` (None: no limit)."""

    def __init__(self, limits: EngineLimits, blocks: BlockManager, hand_off: bool = False,
                 eos_token_ids: frozenset[int] = frozenset(), max_model_len: int | None = None) -> None:
        if blocks.num_blocks != limits.num_kv_blocks:
            raise ValueError(f"the block manager has {blocks.num_blocks} blocks, the limits say "
                             f"{limits.num_kv_blocks}")
        self.config = limits
        self.blocks = blocks
        self.hand_off = hand_off
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: deque[Sequence] = deque()      # WAITING_FOR_KV, no blocks yet
        self.loading: list[Sequence] = []           # WAITING_FOR_KV, blocks held, KV being copied in
        self.expected: dict[str, Expected] = {}     # routed here, still prefilling elsewhere

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Anything to schedule now or later (a KV copy in flight included)."""
        return bool(self.waiting or self.running or self.remote or self.loading)

    def has_runnable(self) -> bool:
        """Something `schedule()` can run now."""
        return bool(self.waiting or self.running)

    def schedule(self, now: float = 0.0, token_budget: int | None = None,
                 drafts: dict[str, list[int]] | None = None) -> Batch | None:
        """The next step's batch (None: nothing to run). A sequence's first step stamps its
        `scheduled_time` with `now`. `token_budget` (chunked policy): this step's tokens instead
        of the standing max_num_batched_tokens (a decode instance's mixed step sized to the TPOT
        SLO: backends.core.router.step_budget). A sequence prefilled here gets its
        `first_token_time` at its first step after that. `drafts`: proposed tokens by request id, for
        decoding sequences to verify this step (see `_attach_drafts`)."""
        budget = token_budget or self.config.max_num_batched_tokens
        if self.config.chunked_prefill:
            batch = self._schedule_chunked(budget)
        else:
            batch = self._schedule_prefill()
            if not batch.seqs:
                batch = self._schedule_decode()
        if not batch.seqs:
            return None
        if drafts and not self.hand_off and not batch.is_prefill:
            self._attach_drafts(batch, drafts, budget - batch.num_tokens)
        for seq in batch.seqs:
            if seq.scheduled_time is None:
                seq.scheduled_time = now
            if seq.first_token_time is None and seq.output_ids:
                seq.first_token_time = now      # its first token came out of the last step
        return batch

    def decodes_next(self) -> bool:
        """Whether the next step can verify drafts: any step of the chunked policy (drafts ride
        beside a chunk), a decode step of the default one, which prefills first whenever a
        waiting prompt has a seat (a drafter asked before such a step drafts for nothing; a
        draft model's call costs a pass or a prompt's prefill)."""
        if self.config.chunked_prefill or self.hand_off:
            return not self.hand_off
        return not (self.waiting and len(self.running) + len(self.loading) < self.config.max_num_seqs)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.config.block_size) - len(seq.block_ids))

    def _schedule_prefill(self) -> Batch:
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) + len(self.loading) + len(batch.seqs) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            num_new = seq.num_tokens - len(hit) * self.config.block_size - seq.num_cached
            if batch.seqs and num_new > budget:
                break                       # a lone long prompt still runs, alone
            if not self._admit(seq, hit, num_new, batch):
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

    def _schedule_chunked(self, budget: int) -> Batch:
        # Decoding sequences first, then prompts part-way through (on a colocated engine only
        # the last admitted can be; on a decode engine a sequence whose KV arrived joins
        # `running` after a local prompt's chunks): with budget >= max_num_seqs every decode
        # fits, and prompt chunks take what is left.
        batch = Batch()
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_cached > 1):
            num_new = min(seq.num_tokens - seq.num_cached, budget)
            if seq in self.running and num_new and self._reserve(seq, seq.num_cached + num_new, batch):
                batch.add(seq, num_new)
                budget -= num_new
        while self.waiting and budget and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            num_new = min(seq.num_tokens - len(hit) * self.config.block_size - seq.num_cached, budget)
            if not self._admit(seq, hit, num_new, batch):
                break
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch.decodes_first()

    def next_chunk_prefix(self) -> int:
        """Tokens cached before the next chunked step's first prompt chunk (attended over)."""
        part = next((q for q in self.running if q.num_cached < q.num_prompt_tokens), None)
        hit = [] if part or not self.waiting else self._cached_prefix(self.waiting[0])
        return part.num_cached if part else len(hit) * self.config.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the leading full blocks of a waiting sequence's tokens (none
        without a prefix cache, or for a sequence that holds blocks already)."""
        cache = self.blocks.cache
        return cache.match(seq) if cache is not None and not seq.block_ids else []

    def _admit(self, seq: Sequence, hit: list[int], num_new: int, batch: Batch) -> bool:
        """Move the head of `waiting` out, with the cached blocks `hit` (its first tokens' K/V,
        not computed: see `_take_cached`) and blocks for `num_new` more tokens, if they are free."""
        num_cached = seq.num_cached + len(hit) * self.config.block_size
        need = max(0, self.config.blocks_for(num_cached + num_new) - len(seq.block_ids) - len(hit))
        num_copies = sum(1 for b in hit if self._must_copy(b))
        if not self.blocks.can_allocate(need + num_copies, hit):
            return False
        if self.blocks.cache is not None:
            self.blocks.cache.stats.record(seq.num_tokens, num_cached - seq.num_cached)
        seq.block_ids += self._take_cached(hit, batch) + self.blocks.allocate(need)
        seq.num_cached = num_cached
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        return True

    def _must_copy(self, block_id: int) -> bool:
        """A prefill engine lends each sequence's blocks to decode under a lease that owns them
        alone (kvtransfer's control table): a cached block another sequence holds is copied."""
        return self.hand_off and self.blocks.ref_count(block_id) > 0

    def _take_cached(self, hit: list[int], batch: Batch) -> list[int]:
        """The cached blocks `hit` for a new sequence: shared (one more reference each), or new
        blocks the step copies them into first (`batch.copies`) where `_must_copy`."""
        ids = []
        for b in hit:
            if self._must_copy(b):
                ids += self.blocks.allocate(1)
                batch.copies.append((b, ids[-1]))
            else:
                ids += self.blocks.share([b])
        return ids

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

    def _attach_drafts(self, batch: Batch, drafts: dict[str, list[int]], budget: int) -> None:
        """Turn decode rows into verify rows: each row's draft, clipped to what it may still
        emit (max_tokens, context length), the step's `budget` and the free blocks."""
        bs = self.config.block_size
        for i, seq in enumerate(batch.seqs[:batch.num_decodes]):
            draft = drafts.get(seq.req_id)
            if not draft or not batch.is_sampled[i]:
                continue
            room = (len(seq.block_ids) + self.blocks.num_free) * bs - seq.num_tokens
            k = min(len(draft), budget, room, self._max_emit(seq) - 1)
            if k <= 0:
                continue
            seq.block_ids += self.blocks.allocate(self._blocks_needed(seq, seq.num_tokens + k))
            batch.num_new[i] += k
            batch.drafts[seq] = list(draft[:k])
            budget -= k
        if batch.drafts:
            batch.decodes_first()

    def _max_emit(self, seq: Sequence) -> int:
        """Tokens `seq` may still emit before max_tokens or the context length stops it."""
        n = seq.params.max_tokens - seq.num_output_tokens
        if self.max_model_len is not None:
            n = min(n, self.max_model_len - seq.num_tokens)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids, seq.num_cached, seq.block_nodes = [], 0, []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # -- state changes after a step --------------------------------------------------------------
    def update(self, batch: Batch, token_ids: list[int]) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Apply a step of one token per sampled row (see `update_accepted`). Returns (sequence,
        token, finish reason) per sampled row, in batch order."""
        return [(seq, ids[0], reason)
                for seq, ids, reason in self.update_accepted(batch, [[t] for t in token_ids])]

    def update_accepted(self, batch: Batch, new_ids: list[list[int]]
                        ) -> list[tuple[Sequence, list[int], FinishReason | None]]:
        """Apply a step: every row's new tokens are cached (a verify row's draft only as far as
        it was accepted); each sampled row gets its tokens (a verify row 1..k+1, the accepted
        draft then the target's own) up to the first that stops it, and finishes then, or
        (hand_off) leaves `running` as PREFILLED with its blocks held. Returns (sequence, tokens
        appended, finish reason) per sampled row, in batch order."""
        drafts = batch.drafts
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_cached += n - len(drafts.get(seq, ()))
            self._cache_blocks(seq)
        out = []
        for seq, ids in zip(batch.sampled_seqs, new_ids):
            reason = None
            for i, token_id in enumerate(ids):
                seq.append_token(token_id)
                reason = self.stop_reason(seq, token_id)
                if reason is not None:
                    ids = ids[:i + 1]
                    break
            if reason is not None:
                seq.finish_reason = reason
                self.finish(seq)
            elif seq in drafts:
                self._roll_back(seq, len(ids) - 1)
            elif self.hand_off:
                self.running.remove(seq)                # KV stays allocated for hand-off
                seq.status = SequenceStatus.PREFILLED
            out.append((seq, ids, reason))
        return out

    def _roll_back(self, seq: Sequence, num_accepted: int) -> None:
        """After verifying: the accepted draft tokens' K/V are kept (cached); the rejected ones'
        slots are dropped, and blocks that held only those go back to the pool."""
        seq.num_cached += num_accepted
        self._cache_blocks(seq)
        keep = self.config.blocks_for(seq.num_cached)
        if len(seq.block_ids) > keep:
            self.blocks.free(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def _cache_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that its K/V now fill (prefix cache)."""
        if self.blocks.cache is not None:
            self.blocks.cache.register(seq)

    def stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or (
                self.max_model_len is not None and seq.num_tokens >= self.max_model_len):
            return FinishReason.LENGTH
        return None

    # -- sequences whose prompt KV is computed elsewhere (a decode instance) -------------------
    def expect(self, joiner: Expected) -> None:
        """A request routed here is being prefilled elsewhere: its wait counts in the TPOT
        slack (tpot_slack) until it arrives (`add_remote`), is aborted, or EXPECT_TTL_S pass."""
        self.expecting(joiner.since)
        self.expected[joiner.req_id] = joiner

    def expecting(self, now: float) -> list[Expected]:
        """The expected joiners, those older than EXPECT_TTL_S dropped (any thread may read)."""
        live = list(self.expected.values())
        if live and now - live[0].since > EXPECT_TTL_S:
            for e in live:
                if now - e.since > EXPECT_TTL_S:
                    self.expected.pop(e.req_id, None)
            live = list(self.expected.values())
        return live

    def add_remote(self, seq: Sequence) -> None:
        """Queue a prefilled sequence (prompt + first token) whose KV is still elsewhere."""
        self.expected.pop(seq.req_id, None)
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.remote.append(seq)

    def admit_remote(self) -> list[Sequence]:
        """Admission policy for remote KV: FIFO, while the head's prompt blocks are free and the
        batch has a slot (sequences still loading count). Blocks are allocated; the caller
        copies each returned sequence's KV into `seq.block_ids`, then calls `kv_arrived`. With
        a prefix cache, the prompt's leading full blocks found in it are shared instead and
        `seq.num_cached` counts their tokens: the caller copies only the blocks past those
        (`seq.block_ids[seq.num_cached // block_size:]`; the partial pull)."""
        admitted = []
        while self.remote and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            seq = self.remote[0]
            hit = self._cached_prefix(seq)          # full prompt blocks (the first token is known)
            need = self.config.blocks_for(seq.num_prompt_tokens) - len(hit)
            if not self.blocks.can_allocate(need, hit):
                break
            self.remote.popleft()
            if self.blocks.cache is not None:
                self.blocks.cache.stats.record(seq.num_prompt_tokens, len(hit) * self.config.block_size)
            seq.block_ids = self.blocks.share(hit) + self.blocks.allocate(need)
            seq.num_cached = len(hit) * self.config.block_size
            self.loading.append(seq)
            admitted.append(seq)
        return admitted

    def kv_arrived(self, seq: Sequence) -> None:
        """The sequence's KV is in: it joins the decode batch at the next step."""
        if seq.status != SequenceStatus.WAITING_FOR_KV or seq not in self.loading:
            raise ValueError(f"request {seq.req_id!r} is not loading KV")
        self.loading.remove(seq)
        seq.num_cached = seq.num_prompt_tokens
        self._cache_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finished or aborted). A loading
        sequence's blocks are being written by its KV copy: finish it only once the copy ended."""
        for queue in (self.running, self.waiting, self.loading, self.remote):
            if seq in queue:
                queue.remove(seq)
                break
        if seq.block_ids:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SequenceStatus.FINISHED

    def num_queued(self) -> int:
        return len(self.waiting) + len(self.remote)
