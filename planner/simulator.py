"""Discrete-event simulator of a deployment, driving the engines' own scheduler.

Every simulated instance owns a real `backends.core.scheduler.Scheduler` over a real
`BlockManager`; a step is `schedule()` (the same policy code that serves), a duration from the
latency model, then the engine's update (one token per sequence, as `LLMEngine._update`).

Lifecycle of a request, disaggregated (as backends/prefill and backends/decode workers):
arrival -> the least-loaded prefill instance's waiting queue -> a prefill batch under L_m ->
first token (TTFT); the sequence leaves the prefill scheduler but keeps its KV blocks ->
`pending` (FIFO) of the least-loaded decode instance: the prefill pool is the queue buffer ->
admitted (pull) at the start of a decode step when it has blocks and a batch slot: blocks
allocated, KV copied (the step waits for the copies, as the worker's fetch does), prefill
blocks freed when the copy ends -> continuous batching, one token per step -> finished, blocks
freed. Colocated: one engine does both (prefill first, as vLLM). Two per-phase modes serve the
high-affinity search: "prefill" (decode is free and instant) and "decode" (requests arrive
already prefilled, TTFT 0).

An instance of pipeline degree pp is pp virtual engines (each its own scheduler, queues and
batch; one KV cache between them) sharing the first pipeline stage: a batch holds the stage
for the latency model's stage time and is done pp stage times later. At pp = 1 that is the
plain engine. The scheduler is driven as it is; only its Sequence and BlockManager are thin
subclasses that make its per-row bookkeeping cheap (SimSequence, SimBlocks).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Literal, Sequence as Seq

import numpy as np

from backends.core.kv_cache import BlockManager
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch, Scheduler, SchedulerConfig
from backends.core.sequence import FinishReason, Sequence, SequenceStatus
from planner.latency import LatencyModel, Link

Mode = Literal["disaggregated", "colocated", "prefill", "decode"]
MODES = ("disaggregated", "colocated", "prefill", "decode")
_PARAMS = SamplingParams(max_tokens=1, seed=0, ignore_eos=True)   # shared; lengths live below
_NUM_TOKENS = attrgetter("num_tokens")


@dataclass(frozen=True)
class Request:
    req_id: int
    arrival: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1 or self.arrival < 0:
            raise ValueError(f"request {self.req_id}: bad lengths or arrival {self}")


@dataclass
class Record:
    req: Request
    first_token: float | None = None
    finish: float | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.req.arrival

    @property
    def tpot(self) -> float:
        n = self.req.output_len
        return (self.finish - self.first_token) / (n - 1) if n > 1 else 0.0

    def meets(self, ttft: float, tpot: float) -> bool:
        return self.ttft <= ttft and self.tpot <= tpot


class SimSequence(Sequence):
    """The engine's Sequence (compared by identity, as every Sequence), with `num_tokens` a plain
    attribute that `append_token` keeps equal to len(prompt_ids) + len(output_ids) (the
    scheduler reads it several times per row per step). `rec` is the request's Record."""
    num_tokens = 0                      # shadows Sequence.num_tokens (a property)

    def __init__(self, rec: Record, output_ids: Seq[int] = (),
                 status: SequenceStatus = SequenceStatus.WAITING) -> None:
        super().__init__(str(rec.req.req_id), [0] * rec.req.prompt_len, _PARAMS,
                         output_ids=list(output_ids), status=status)
        self.rec = rec
        self.num_tokens = rec.req.prompt_len + len(self.output_ids)

    def append_token(self, token_id: int = 0) -> None:
        self.output_ids.append(token_id)
        self.num_tokens += 1


def _stop_at_length(seq: SimSequence, token_id: int) -> FinishReason | None:
    return FinishReason.LENGTH if len(seq.output_ids) >= seq.rec.req.output_len else None


class SimBlocks(BlockManager):
    """The engine's BlockManager; `allocate(0)` (most decode rows need no new block) returns
    at once instead of building an empty list through the pool."""

    def allocate(self, n: int) -> list[int]:
        return super().allocate(n) if n else []


@dataclass(frozen=True)
class InstanceSpec:
    latency: LatencyModel
    num_kv_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048          # L_m (per step when chunked)
    block_size: int = 16
    chunked_prefill: bool = False

    def scheduler(self, blocks: BlockManager | None = None, hand_off: bool = False) -> Scheduler:
        config = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.block_size,
                                 self.chunked_prefill, hand_off=hand_off)
        return Scheduler(config, blocks or SimBlocks(self.num_kv_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class SimConfig:
    mode: Mode
    prefill: InstanceSpec | None = None          # also the colocated engine's spec
    decode: InstanceSpec | None = None
    num_prefill: int = 1
    num_decode: int = 1
    link: Link | None = None                     # None: KV copies take no time
    kv_bytes_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "decode" and self.prefill is None:
            raise ValueError(f"mode {self.mode} needs a prefill (or colocated) InstanceSpec")
        if self.mode in ("disaggregated", "decode") and self.decode is None:
            raise ValueError(f"mode {self.mode} needs a decode InstanceSpec")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("instance counts must be >= 1")


class _Stage:
    """The first pipeline stage of one instance, shared by its pp virtual engines: one batch
    at a time enters it and holds it for the latency model's (per-stage) time; the batch is
    done pp stage times later, so pp batches can be in flight but none is faster than at pp 1."""

    def __init__(self, pp: int) -> None:
        self.pp = pp
        self.busy = False
        self.engines: list[_Engine] = []


class _Engine:
    """One scheduler: an instance at pp 1, one of its pp virtual engines otherwise (vLLM's
    virtual engines: own queues and batches, one KV cache shared by the instance)."""

    def __init__(self, role: str, index: int, spec: InstanceSpec, stage: _Stage,
                 blocks: BlockManager) -> None:
        self.role, self.index, self.spec, self.stage = role, index, spec, stage
        self.scheduler = spec.scheduler(blocks, hand_off=role == "prefill")
        self.blocks = blocks
        self.pending: deque[tuple[Sequence, _Engine | None]] = deque()
        self.busy = False
        self.num_steps = self.num_preempted = self.peak_blocks = 0

    def load(self) -> int:
        return len(self.pending) + len(self.scheduler.waiting) + len(self.scheduler.running)

    def step_time(self, batch: Batch) -> float:
        """Prefill rows cost by their new tokens; decode rows by their context. A mixed
        (chunked) step pays the prefill part plus the decode part's marginal cost (its
        constant term overlaps with the prefill's)."""
        lat = self.spec.latency
        k = batch.num_decodes
        decode = 0.0
        if k:
            decode = lat.decode_time(k, sum(map(_NUM_TOKENS, batch.seqs[:k])))
            if k == len(batch.seqs):
                return decode
            decode -= lat.decode_time(k, 0) - lat.decode_time(k, 0, marginal=True)
        return lat.prefill_time(batch.num_new[k:]) + decode


def in_window(window: tuple[float, float] | None, t: float) -> bool:
    return window is None or window[0] <= t < window[1]


@dataclass
class SimResult:
    records: list[Record]
    end_time: float
    stopped_early: bool = False
    stats: dict[str, dict] = field(default_factory=dict)
    window: tuple[float, float] | None = None       # arrivals counted by attainment()

    @property
    def measured(self) -> list[Record]:
        """The records whose arrival falls in the window (all of them without one)."""
        if self.window is None:
            return self.records
        return [r for r in self.records if in_window(self.window, r.req.arrival)]

    def attainment(self, ttft: float, tpot: float) -> float:
        measured = self.measured
        if self.stopped_early or not measured:
            return 0.0
        return sum(r.meets(ttft, tpot) for r in measured) / len(measured)

    def mean_ttft(self) -> float:
        return float(np.mean([r.ttft for r in self.records]))


class Simulator:
    """One run over `requests`. `window=(t0, t1)`: only requests arriving in [t0, t1) count
    towards attainment (the others load the system: a warm-up before, a tail after).
    `stop_below=(ttft, tpot, target)` ends the run as soon as the attainment target can no
    longer be met (the result is then marked `stopped_early`)."""

    def __init__(self, config: SimConfig, requests: Seq[Request],
                 stop_below: tuple[float, float, float] | None = None,
                 window: tuple[float, float] | None = None) -> None:
        self.config = config
        self.requests = sorted(requests, key=lambda r: (r.arrival, r.req_id))
        self.records = {r.req_id: Record(r) for r in self.requests}
        if len(self.records) != len(self.requests):
            raise ValueError("request ids must be unique")
        self.stop_below, self.window = stop_below, window
        num_measured = sum(in_window(window, r.arrival) for r in self.requests)
        self._max_misses = (math.floor((1 - stop_below[2]) * num_measured)
                            if stop_below else len(self.requests))
        self._misses = 0
        self._events: list = []
        self._counter = 0
        self.now = 0.0
        self.prefills = self._make("prefill", config.num_prefill, config.prefill,
                                   config.mode in ("disaggregated", "prefill"))
        self.decodes = self._make("decode", config.num_decode, config.decode,
                                  config.mode in ("disaggregated", "decode"))
        self.colocated = self._make("both", config.num_prefill, config.prefill,
                                    config.mode == "colocated")
        self._validate()

    def _make(self, role: str, n: int, spec: InstanceSpec | None, used: bool) -> list[_Engine]:
        if not used:
            return []
        pp, engines = spec.latency.pp, []
        for i in range(n):
            stage, blocks = _Stage(pp), SimBlocks(spec.num_kv_blocks)
            stage.engines = [_Engine(role, i * pp + v, spec, stage, blocks) for v in range(pp)]
            engines += stage.engines
        return engines

    def _validate(self) -> None:
        for r in self.requests:
            for e in (self.prefills + self.colocated)[:1]:
                if e.spec.blocks_for(r.prompt_len + (r.output_len if e.role == "both" else 0)) \
                        > e.spec.num_kv_blocks:
                    raise ValueError(f"request {r.req_id} does not fit the {e.role} KV cache")
            for e in self.decodes[:1]:
                if e.spec.blocks_for(r.prompt_len + r.output_len) > e.spec.num_kv_blocks:
                    raise ValueError(f"request {r.req_id} does not fit the decode KV cache")

    # ---- the event loop -----------------------------------------------------------------
    def _at(self, t: float, fn: Callable, *args) -> None:
        self._counter += 1
        heapq.heappush(self._events, (t, self._counter, fn, args))

    def run(self) -> SimResult:
        for r in self.requests:
            self._at(r.arrival, self._arrive, r)
        stopped = False
        while self._events:
            self.now, _, fn, args = heapq.heappop(self._events)
            fn(*args)
            if self._misses > self._max_misses:
                stopped = True
                break
        if not stopped:
            self._check_drained()
        return SimResult(list(self.records.values()), self.now, stopped, self._stats(), self.window)

    def _arrive(self, r: Request) -> None:
        rec = self.records[r.req_id]
        seq = SimSequence(rec)
        if self.config.mode == "decode":
            seq.append_token()
            seq.status = SequenceStatus.PREFILLED
            self._first_token(rec)
            self._hand_off(seq, None)
            return
        engines = self.colocated or self.prefills
        engine = min(engines, key=lambda e: (e.load(), e.index))
        engine.scheduler.add(seq)
        self._poke(engine)

    def _poke(self, e: _Engine) -> None:
        """Start a step on an idle engine if it has anything to do (schedule, execute...).
        Each pipeline stage copies its own layers' KV, so a copy holds a stage 1/pp of it."""
        stage = e.stage
        if e.busy or stage.busy:
            return
        transfer = self._admit(e) if e.role == "decode" else 0.0
        batch = e.scheduler.schedule()
        if batch is None and transfer == 0.0:
            return
        e.busy = True
        e.num_steps += 1
        e.peak_blocks = max(e.peak_blocks, e.blocks.num_used)
        if batch is not None:
            e.num_preempted += len(batch.preempted)
        duration = transfer / stage.pp + (e.step_time(batch) if batch is not None else 0.0)
        if stage.pp > 1:
            stage.busy = True
            self._at(self.now + duration, self._stage_free, stage)
        self._at(self.now + stage.pp * duration, self._step_done, e, batch)

    def _stage_free(self, stage: _Stage) -> None:
        stage.busy = False
        for e in stage.engines:
            self._poke(e)

    def _step_done(self, e: _Engine, batch: Batch | None) -> None:
        """...update: the scheduler's own `update`, as in LLMEngine.step (tokens are dummies;
        a request stops at its recorded output length)."""
        e.busy = False
        if batch is not None:
            for seq, _, reason in e.scheduler.update(batch, [0] * len(batch.sampled_seqs), _stop_at_length):
                self._after_token(e, seq, reason)
        self._poke(e)

    def _after_token(self, e: _Engine, seq: SimSequence, reason: FinishReason | None) -> None:
        rec = seq.rec
        if rec.first_token is None:
            self._first_token(rec)
        if reason is not None:
            self._finish(rec)
        elif seq.status == SequenceStatus.PREFILLED:       # a prefill instance's hand-off
            self._hand_off(seq, e)

    # ---- disaggregation -----------------------------------------------------------------
    def _hand_off(self, seq: Sequence, src: _Engine | None) -> None:
        if self.config.mode == "prefill":                  # decode is free and instant
            src.scheduler.finish(seq)
            self._finish(seq.rec)
            return
        dst = min(self.decodes, key=lambda e: (e.load(), e.index))
        dst.pending.append((seq, src))
        self._poke(dst)

    def _admit(self, e: _Engine) -> float:
        """Pull prefilled requests while blocks and batch slots last (DecodeWorker._admit,
        LLMEngine.can_admit / add_prefilled / start_decoding); returns the copy time."""
        total = 0.0
        sched = e.scheduler
        while e.pending:
            pseq, src = e.pending[0]
            need = e.spec.blocks_for(pseq.num_prompt_tokens)
            if not sched.can_admit(need):
                break
            e.pending.popleft()
            seq = SimSequence(pseq.rec, pseq.output_ids)
            sched.admit_prefilled(seq, need)
            total += self._copy_time(pseq.num_prompt_tokens)
            if src is not None:
                self._at(self.now + total, self._release, src, pseq)
            sched.start_decoding(seq)
        return total

    def _copy_time(self, num_tokens: int) -> float:
        link = self.config.link
        return 0.0 if link is None else link.transfer_time(num_tokens * self.config.kv_bytes_per_token)

    def _release(self, src: _Engine, pseq: Sequence) -> None:
        src.scheduler.finish(pseq)
        self._poke(src)

    # ---- records and checks -------------------------------------------------------------
    def _counts(self, rec: Record) -> bool:
        return self.stop_below is not None and in_window(self.window, rec.req.arrival)

    def _first_token(self, rec: Record) -> None:
        rec.first_token = self.now
        if self._counts(rec) and rec.ttft > self.stop_below[0]:
            self._misses += 1

    def _finish(self, rec: Record) -> None:
        rec.finish = self.now
        if self._counts(rec) and rec.ttft <= self.stop_below[0] and rec.tpot > self.stop_below[1]:
            self._misses += 1

    def _engines(self) -> list[_Engine]:
        return self.prefills + self.decodes + self.colocated

    def _check_drained(self) -> None:
        lost = [r.req.req_id for r in self.records.values() if r.finish is None]
        if lost:
            raise RuntimeError(f"simulation lost {len(lost)} request(s), e.g. {lost[:5]}")
        for e in self._engines():
            s = e.scheduler
            if s.waiting or s.running or e.pending or e.blocks.num_used or e.busy:
                raise RuntimeError(f"{e.role} instance {e.index} did not drain: {len(s.waiting)} "
                                   f"waiting, {len(s.running)} running, {len(e.pending)} pending, "
                                   f"{e.blocks.num_used} blocks used")
            if e.peak_blocks > e.blocks.num_blocks:
                raise RuntimeError(f"{e.role} instance {e.index} used more blocks than it has")

    def _stats(self) -> dict[str, dict]:
        return {f"{e.role}{e.index}": {"steps": e.num_steps, "preempted": e.num_preempted,
                                       "peak_blocks": e.peak_blocks, "num_blocks": e.blocks.num_blocks}
                for e in self._engines()}


# ---- arrivals and workloads ------------------------------------------------------------

def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """n Poisson arrival times at `rate` (per second). One seed gives the same pattern, scaled,
    at every rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0, size=n) / rate
    return np.cumsum(gaps).tolist()


def make_requests(lengths: Seq[tuple[int, int]], arrivals: Seq[float]) -> list[Request]:
    """Requests from (prompt_len, output_len) pairs and arrival times (a trace or Poisson)."""
    if len(lengths) != len(arrivals):
        raise ValueError(f"{len(lengths)} lengths but {len(arrivals)} arrival times")
    return [Request(i, float(t), int(p), int(o)) for i, ((p, o), t) in enumerate(zip(lengths, arrivals))]


def simulate(config: SimConfig, lengths: Seq[tuple[int, int]], rate: float, seed: int = 0,
             stop_below: tuple[float, float, float] | None = None,
             window: tuple[float, float] | None = None) -> SimResult:
    """Poisson arrivals at `rate` over `lengths` (in order)."""
    return Simulator(config, make_requests(lengths, poisson_arrivals(len(lengths), rate, seed)),
                     stop_below, window).run()
