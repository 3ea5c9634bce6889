"""Discrete-event simulator of a deployment, driving the engines' own scheduler.

Every simulated instance owns a real `backends.core.scheduler.Scheduler` over a real
`BlockManager` and real `Sequence`s; a step is the scheduler's `schedule(now)` (the same policy
code that serves), a duration from the latency model, then the scheduler's `update()` (as
`LLMEngine.step`; a request stops at its recorded output length through its max_tokens).

Lifecycle of a request, disaggregated (as backends/prefill and backends/decode workers):
arrival -> the least-loaded prefill instance's waiting queue -> a prefill batch under L_m ->
first token (TTFT); the sequence leaves the prefill scheduler but keeps its KV blocks -> the
least-loaded decode instance's remote queue (`add_remote`; the prefill pool is the queue
buffer) -> admitted by the scheduler's `admit_remote()` at a step boundary when it has blocks
and a batch slot -> its KV copied by the instance's copy thread beside the running steps (one
copy at a time), prefill blocks freed when the copy ends -> `kv_arrived()`: continuous
batching, one token per step -> finished, blocks freed. Colocated: one engine does both
(prefill first, as vLLM). Adaptive: the same instances, each request routed by
`backends.core.router.route` to split (as above, to the instances it chose) or local (prefilled
in chunks inside a decode instance's steps), or held until it can be (planner/sim_routing.py).
Two per-phase modes serve the high-affinity search: "prefill" (decode is free and instant) and
"decode" (requests arrive already prefilled, TTFT 0).

An instance of pipeline degree pp is pp virtual engines (each its own scheduler, queues and
batch; one KV cache between them) sharing the first pipeline stage: a batch holds the stage
for the latency model's stage time and is done pp stage times later. At pp = 1 that is the
plain engine.

Speculative decoding (`InstanceSpec.speculation`, planner/sim_spec.py): a decode or colocated
instance's decoding sequences verify k drafted tokens each step through the same scheduler
calls as the served engine, accepted with the measured rate (seeded).

Shared cores (`num_shared_decode` k decode instances on prefill instances' cores, processor
sharing): planner/sim_cores.py.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence as Seq

from backends.core.kv_cache import BlockManager
from backends.core.limits import EngineLimits
from backends.core.router import SLO as RouterSLO
from backends.core.routing import least_loaded
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch, Scheduler
from backends.core.sequence import FinishReason, Sequence, SequenceStatus
from planner.latency import LatencyModel, Link
from planner.sim_routing import Routing
from planner.sim_cores import SharedCores, Stage
from planner.sim_spec import Speculation, step_rows
from planner.sim_records import (Record, Request, SimResult, in_window, make_requests,  # noqa: F401
                                 poisson_arrivals)

Mode = Literal["disaggregated", "colocated", "prefill", "decode", "adaptive"]
MODES = ("disaggregated", "colocated", "prefill", "decode", "adaptive")
SPLIT_MODES = ("disaggregated", "adaptive")        # prefill and decode instances


@dataclass(frozen=True)
class InstanceSpec:
    latency: LatencyModel
    limits: EngineLimits
    speculation: Speculation | None = None       # decode / colocated: drafts verified each step

    def scheduler(self, blocks: BlockManager | None = None, hand_off: bool = False) -> Scheduler:
        return Scheduler(self.limits, blocks or BlockManager(self.limits.num_kv_blocks), hand_off)

    def blocks_for(self, num_tokens: int) -> int:
        return self.limits.blocks_for(num_tokens)


@dataclass(frozen=True)
class SimConfig:
    mode: Mode
    prefill: InstanceSpec | None = None          # also the colocated engine's spec
    decode: InstanceSpec | None = None
    num_prefill: int = 1
    num_decode: int = 1
    link: Link | None = None                     # None: KV copies take no time
    kv_bytes_per_token: float = 0.0
    slo: RouterSLO | None = None                 # adaptive: the SLOs the router routes by
    num_shared_decode: int = 0                   # decode instances on prefill instances' cores

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "decode" and self.prefill is None:
            raise ValueError(f"mode {self.mode} needs a prefill (or colocated) InstanceSpec")
        if self.mode in (*SPLIT_MODES, "decode") and self.decode is None:
            raise ValueError(f"mode {self.mode} needs a decode InstanceSpec")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("instance counts must be >= 1")
        if self.num_shared_decode:
            if self.mode not in SPLIT_MODES or not 0 < self.num_shared_decode <= self.num_prefill:
                raise ValueError(f"num_shared_decode must be in [0, num_prefill] in a split mode, "
                                 f"got {self.num_shared_decode} ({self.mode}, {self.num_prefill} prefill)")
            if self.prefill.latency.pp > 1 or self.decode.latency.pp > 1:
                raise ValueError("shared cores are simulated for pp = 1 instances only")
        if self.mode == "adaptive" and (self.slo is None or not self.decode.limits.chunked_prefill):
            raise ValueError("mode adaptive needs the SLOs to route by and decode instances with "
                             "chunked_prefill (their steps carry local prompts' chunks)")

    def adaptive(self, slo: RouterSLO) -> SimConfig:
        """This disaggregated deployment served adaptively: the same instances, the decode
        instances running mixed (chunked) steps under their token budget."""
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"only a disaggregated config can be served adaptively, not {self.mode}")
        decode = replace(self.decode, limits=replace(self.decode.limits, chunked_prefill=True))
        return replace(self, mode="adaptive", decode=decode, slo=slo)

    def split(self) -> SimConfig:
        """The same instances served as pure split (the inverse of `adaptive`)."""
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"only a disaggregated or adaptive config has a split, not {self.mode}")
        decode = replace(self.decode, limits=replace(self.decode.limits, chunked_prefill=False))
        return replace(self, mode="disaggregated", decode=decode, slo=None)

    def shared(self) -> SimConfig:
        """This config plus one decode instance on each prefill instance's cores."""
        return replace(self, num_shared_decode=self.num_prefill)

    @property
    def num_decode_instances(self) -> int:
        return self.num_decode + self.num_shared_decode


class _Engine:
    """One scheduler: an instance at pp 1, one of its pp virtual engines otherwise (vLLM's
    virtual engines: own queues and batches, one KV cache shared by the instance)."""

    def __init__(self, role: str, index: int, spec: InstanceSpec, stage: Stage,
                 blocks: BlockManager) -> None:
        self.role, self.index, self.spec, self.stage = role, index, spec, stage
        self.scheduler = spec.scheduler(blocks, hand_off=role == "prefill")
        self.blocks = blocks
        self.busy = False
        self.copy_free_at = 0.0             # decode: when its copy thread is free
        self.cores: SharedCores | None = None    # cores shared with another instance
        self.num_steps = self.num_preempted = self.peak_blocks = 0

    def load(self) -> int:
        s = self.scheduler
        return len(s.remote) + len(s.waiting) + len(s.running) + len(s.loading)

    def step_time(self, batch: Batch) -> float:
        """Prefill rows cost by their new tokens; decode rows by their context. A mixed
        (chunked) step pays the prefill part plus the decode part's marginal cost (its
        constant term overlaps with the prefill's)."""
        lat = self.spec.latency
        rows, ctx, prompts = step_rows(batch)          # a verify row: 1 + k decode rows
        decode = 0.0
        if rows:
            decode = lat.decode_time(rows, ctx)
            if not prompts:
                return decode
            decode -= lat.decode_time(rows, 0) - lat.decode_time(rows, 0, marginal=True)
        return lat.prefill_time([batch.num_new[i] for i in prompts],
                                [batch.seqs[i].num_cached for i in prompts]) + decode


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
        self._params: dict[int, SamplingParams] = {}
        self._sources: dict[Sequence, tuple[_Engine | None, Sequence]] = {}   # decode seq -> prefill
        self.now = 0.0
        self.rng = random.Random(0)                 # speculation's acceptances
        self.prefills = self._make("prefill", config.num_prefill, config.prefill,
                                   config.mode in (*SPLIT_MODES, "prefill"))
        self.decodes = self._make("decode", config.num_decode_instances, config.decode,
                                  config.mode in (*SPLIT_MODES, "decode"))
        for i in range(config.num_shared_decode):
            cores = SharedCores()
            self.prefills[i].cores = self.decodes[config.num_decode + i].cores = cores
        self.colocated = self._make("both", config.num_prefill, config.prefill,
                                    config.mode == "colocated")
        self._validate()
        self.routing = Routing(self, config.slo) if config.mode == "adaptive" else None

    def _make(self, role: str, n: int, spec: InstanceSpec | None, used: bool) -> list[_Engine]:
        if not used:
            return []
        pp, engines = spec.latency.pp, []
        for i in range(n):
            stage, blocks = Stage(pp), BlockManager(spec.limits.num_kv_blocks)
            stage.engines = [_Engine(role, i * pp + v, spec, stage, blocks) for v in range(pp)]
            engines += stage.engines
        return engines

    def _validate(self) -> None:
        for r in self.requests:
            for e in (self.prefills + self.colocated)[:1]:
                if e.spec.blocks_for(r.prompt_len + (r.output_len if e.role == "both" else 0)) \
                        > e.spec.limits.num_kv_blocks:
                    raise ValueError(f"request {r.req_id} does not fit the {e.role} KV cache")
            for e in self.decodes[:1]:
                if e.spec.blocks_for(r.prompt_len + r.output_len) > e.spec.limits.num_kv_blocks:
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

    def _sequence(self, rec: Record, output_ids: list[int] | None = None) -> Sequence:
        """The request as the engine holds it: a prompt of its length, and a stop at its
        output length (max_tokens; EOS ignored); prefilled (`output_ids`): its first token's
        time as a decode instance has it (its arrival there)."""
        r = rec.req
        params = self._params.get(r.output_len)
        if params is None:
            params = self._params[r.output_len] = SamplingParams(max_tokens=r.output_len, seed=0,
                                                                 ignore_eos=True)
        return Sequence(str(r.req_id), [0] * r.prompt_len, params, output_ids=output_ids or [],
                        arrival_time=r.arrival, first_token_time=self.now if output_ids else None)

    def _arrive(self, r: Request) -> None:
        rec = self.records[r.req_id]
        if self.config.mode == "decode":
            seq = self._sequence(rec, [0])
            self._first_token(rec)
            self._hand_off(seq, None)
            return
        if self.routing is not None:
            self.routing.arrive(rec)
            return
        engines = self.colocated or self.prefills
        engine = least_loaded(engines, _Engine.load)
        engine.scheduler.add(self._sequence(rec))
        self._poke(engine)

    def _poke(self, e: _Engine) -> None:
        """Start a step on an idle engine if it has anything to do (schedule, execute...)."""
        stage = e.stage
        if e.busy or stage.busy:
            return
        if e.role == "decode":                              # at a step boundary, as the worker
            self._admit(e)
        spec = e.spec.speculation if e.role != "prefill" else None
        drafts = spec.drafts(e.scheduler) if spec else None
        if self.routing is not None and e.role == "decode":
            batch = self.routing.schedule(e, self.now, drafts)  # its step budget: decodes + a chunk
        else:
            batch = e.scheduler.schedule(self.now, None, drafts)
        if batch is None:
            return
        e.busy = True
        e.num_steps += 1
        e.peak_blocks = max(e.peak_blocks, e.blocks.num_used)
        e.num_preempted += len(batch.preempted)
        duration = e.step_time(batch)
        if e.cores is not None:
            e.cores.start(self, e, duration, batch)
            return
        if stage.pp > 1:
            stage.busy = True
            self._at(self.now + duration, self._stage_free, stage)
        self._at(self.now + stage.pp * duration, self._step_done, e, batch)

    def _stage_free(self, stage: Stage) -> None:
        stage.busy = False
        for e in stage.engines:
            self._poke(e)

    def _shared_step_done(self, cores: SharedCores, version: int, e: _Engine) -> None:
        if version == cores.version:                       # else re-planned since
            self._step_done(e, cores.end(self, e))

    def _step_done(self, e: _Engine, batch: Batch) -> None:
        """...update: the scheduler's own `update`, as in LLMEngine.step (tokens are dummies)."""
        e.busy = False
        spec = e.spec.speculation
        new_ids = spec.new_ids(batch, self.rng) if spec and batch.drafts else [[0]] * len(batch.sampled_seqs)
        for seq, _, reason in e.scheduler.update_accepted(batch, new_ids):
            self._after_token(e, seq, reason)
        self._poke(e)

    def _after_token(self, e: _Engine, seq: Sequence, reason: FinishReason | None) -> None:
        rec = self.records[int(seq.req_id)]
        if rec.first_token is None:
            self._first_token(rec)
        if reason is not None:
            self._finish(rec)
        elif seq.status == SequenceStatus.PREFILLED:       # a prefill instance's hand-off
            self._hand_off(seq, e)

    # ---- disaggregation -----------------------------------------------------------------
    def _hand_off(self, pseq: Sequence, src: _Engine | None) -> None:
        if self.config.mode == "prefill":                  # decode is free and instant
            src.scheduler.finish(pseq)
            self._finish(self.records[int(pseq.req_id)])
            return
        if self.routing is not None:
            dst = self.routing.decode_for(int(pseq.req_id))
        else:
            dst = least_loaded(self.decodes, _Engine.load)
        seq = self._sequence(self.records[int(pseq.req_id)], list(pseq.output_ids))
        self._sources[seq] = (src, pseq)
        dst.scheduler.add_remote(seq)
        self._poke(dst)

    def _admit(self, e: _Engine) -> None:
        """The scheduler admits (`admit_remote`, as DecodeWorker); each admitted sequence's KV
        is copied on the instance's copy thread, one copy after another, beside its steps.
        Each pipeline stage copies its own layers' KV, so a copy takes 1/pp of the time."""
        for seq in e.scheduler.admit_remote():
            start = max(self.now, e.copy_free_at)
            e.copy_free_at = start + self._copy_time(seq.num_prompt_tokens) / e.stage.pp
            self._at(e.copy_free_at, self._kv_in, e, seq)

    def _kv_in(self, e: _Engine, seq: Sequence) -> None:
        src, pseq = self._sources.pop(seq)
        if src is not None:
            src.scheduler.finish(pseq)
            self._poke(src)
            if self.routing is not None:                   # prefill KV freed
                self.routing.changed()
        e.scheduler.kv_arrived(seq)
        self._poke(e)

    def _copy_time(self, num_tokens: int) -> float:
        link = self.config.link
        return 0.0 if link is None else link.transfer_time(num_tokens * self.config.kv_bytes_per_token)

    # ---- records and checks -------------------------------------------------------------
    def _counts(self, rec: Record) -> bool:
        return self.stop_below is not None and in_window(self.window, rec.req.arrival)

    def _first_token(self, rec: Record) -> None:
        rec.first_token = self.now
        if self._counts(rec) and rec.ttft > self.stop_below[0]:
            self._misses += 1

    def _finish(self, rec: Record) -> None:
        rec.finish = self.now
        if self.routing is not None:
            self.routing.finished(rec)
        if self._counts(rec) and rec.ttft <= self.stop_below[0] and rec.tpot > self.stop_below[1]:
            self._misses += 1

    def _engines(self) -> list[_Engine]:
        return self.prefills + self.decodes + self.colocated

    def _check_drained(self) -> None:
        lost = [r.req.req_id for r in self.records.values() if r.finish is None]
        if self.routing is not None and (self.routing.held or self.routing.holds):
            raise RuntimeError(f"the router still holds {len(self.routing.held)} request(s) and "
                               f"{len(self.routing.holds)} KV reservation(s)")
        if lost:
            raise RuntimeError(f"simulation lost {len(lost)} request(s), e.g. {lost[:5]}")
        for e in self._engines():
            s = e.scheduler
            if s.has_work() or e.blocks.num_used or e.busy:
                raise RuntimeError(f"{e.role} instance {e.index} did not drain: {len(s.waiting)} "
                                   f"waiting, {len(s.running)} running, {len(s.remote)} pending, "
                                   f"{e.blocks.num_used} blocks used")
            if e.peak_blocks > e.blocks.num_blocks:
                raise RuntimeError(f"{e.role} instance {e.index} used more blocks than it has")

    def _stats(self) -> dict[str, dict]:
        out = {f"{e.role}{e.index}": {"steps": e.num_steps, "preempted": e.num_preempted,
                                      "peak_blocks": e.peak_blocks, "num_blocks": e.blocks.num_blocks}
               for e in self._engines()}
        if self.routing is not None:
            out["router"] = {"skipped_decode_rows": self.routing.skipped}
        return out


def simulate(config: SimConfig, lengths: Seq[tuple[int, int]], rate: float, seed: int = 0,
             stop_below: tuple[float, float, float] | None = None,
             window: tuple[float, float] | None = None) -> SimResult:
    """Poisson arrivals at `rate` over `lengths` (in order)."""
    return Simulator(config, make_requests(lengths, poisson_arrivals(len(lengths), rate, seed)),
                     stop_below, window).run()
