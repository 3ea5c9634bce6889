"""Goodput search and DistServe's two placement algorithms (placement.py runs them).

goodput(sim config), the rate search of one simulated config, and the SLO it is measured
against live in planner.rate_search (re-exported here).

High node-affinity (the paper's Algorithm 1): the best (tp, pp) per phase by its own goodput per
device (prefill simulated alone, decode simulated alone), then replicate the two to fill the
cluster: n = ceil(R / prefill goodput), m = ceil(R / decode goodput).
Low node-affinity (Algorithm 2): both phases share pp; stage k of every instance of a unit sits
on node k, so KV moves over the node's fast link. A unit is n_p prefill (tp_p) + n_d decode
(tp_d) instances with n_p * tp_p + n_d * tp_d <= GPUs per node. Units are ranked by the
per-phase goodputs (min(n_p * g_p, n_d * g_d)), the best are simulated whole.

The search is branch and bound: prefill alone is cheap to simulate and is searched for every
(tp, pp); decode alone is not, and a decode (tp, pp) is searched only when its bound (the fluid
rate of decode_fluid_rate() x a margin) could beat what has been found. Phase searches are
memoised and independent ones run in worker processes.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Sequence

from deploy.deployment import SERVE_MODES  # noqa: F401 - the planner names the same modes
from deploy.deployment import DEFAULT_DECODE_STEP_TOKENS as DECODE_STEP_TOKENS
from backends.core.limits import EngineLimits
from planner.latency import ETHERNET_25G, NVLINK_A100, LatencyTable, Link, model_key
from planner.rate_search import (SLO, Probe, decode_fluid_rate, fits, goodput, lifetime,
                                 make_probe, prefill_capacity)
from planner.sim_spec import Speculation
from planner.simulator import InstanceSpec, SimConfig


def decode_step_tokens(max_num_seqs: int) -> int:
    """A decode instance's step budget: DECODE_STEP_TOKENS (its mixed steps in adaptive mode),
    never below one token for each sequence it runs."""
    return max(DECODE_STEP_TOKENS, max_num_seqs)


@dataclass(frozen=True)
class Cluster:
    num_nodes: int
    gpus_per_node: int
    device: str = "a100-80gb"
    intra_link: Link = NVLINK_A100
    inter_link: Link = ETHERNET_25G

    @classmethod
    def parse(cls, text: str, device: str = "a100-80gb") -> Cluster:
        """'4x8' = 4 nodes of 8 devices."""
        try:
            nodes, per = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"devices must look like NODESxPER_NODE (e.g. 4x8), got {text!r}") from None
        if nodes < 1 or per < 1:
            raise ValueError(f"devices must be >= 1x1, got {text!r}")
        return cls(nodes, per, device)

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass(frozen=True)
class SearchSpace:
    """What the planner may choose, and the simulation budget per probe.

    A probe is one seeded run at a Poisson rate. Its first `warmup_lifetimes` request lifetimes
    of arrivals only load the system (a decode batch takes about one lifetime to fill, and a
    run that counts them reads a half-empty system as capacity); attainment counts the requests
    after it, over at least `window_lifetimes` lifetimes, `min_span_s` seconds and
    `num_requests` requests, at most `max_requests`. A lifetime is TTFT + mean output x TPOT,
    the longest a request may live and meet both SLOs (TTFT alone when prefill runs alone)."""
    model: str
    table: LatencyTable
    capacity: dict[tuple[str, int, int], int]       # KV tokens per (model, tp, pp)
    pps: tuple[int, ...] = (1, 2, 4)
    block_size: int = 16
    max_num_seqs: int = 256
    prefill_budget: int = 2048                       # L_m
    kv_bytes_per_token: float = 0.0
    num_requests: int = 300
    min_span_s: float = 30.0
    max_requests: int = 20000
    warmup_lifetimes: float = 1.0
    window_lifetimes: float = 4.0
    verify_lifetimes: float = 1.0                    # window of a whole-deployment check...
    verify_rel_tol: float = 0.08                     # ...and its resolution
    decode_bound_margin: float = 1.2                 # fluid decode rate x this bounds its goodput
    seed: int = 0
    rel_tol: float = 0.04
    workers: int = 1                                 # processes for independent searches
    speculation: Speculation | None = None           # decode and colocated instances speculate

    def instance(self, device: str, tp: int, pp: int, table: LatencyTable | None = None,
                 max_num_seqs: int | None = None, decode: bool = False) -> InstanceSpec | None:
        """The instance spec, or None when (tp, pp) has no latency model or does not fit;
        `decode`: a decode instance's, its steps' token budget decode_step_tokens (its mixed
        steps in adaptive mode), not the prefill batch's L_m."""
        tokens = self.capacity.get((model_key(self.model), tp, pp))
        try:
            lat = (table or self.table).get(self.model, device, tp, pp)
        except KeyError:
            return None
        if tokens is None:
            return None
        seqs = max_num_seqs or self.max_num_seqs
        budget = decode_step_tokens(seqs) if decode else self.prefill_budget
        return InstanceSpec(lat, EngineLimits(tokens // self.block_size, seqs, budget, self.block_size),
                            self.speculation)


@dataclass(frozen=True)
class PhaseChoice:
    tp: int
    pp: int
    goodput: float                      # per instance, requests/s

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    @property
    def per_device(self) -> float:
        return self.goodput / self.num_devices


# How a placement is served: pure split (every prompt on a prefill instance, KV handed to a
# decode instance), adaptive (the router picks split or local prefill inside a decode
# instance's steps, per request), or colocated (every instance runs both phases).
ServeMode = Literal["split", "adaptive", "colocated"]


@dataclass(frozen=True)
class Placement:
    algorithm: Literal["high", "low", "colocated"]
    prefill: PhaseChoice
    decode: PhaseChoice | None
    num_prefill: int                    # per unit for "low", total otherwise
    num_decode: int
    num_units: int                      # node groups of `pp` nodes ("low"); 1 otherwise
    goodput: float                      # requests/s of the whole cluster, simulated
    num_devices: int                    # devices the placement uses
    notes: dict = field(default_factory=dict)
    mode: ServeMode = "split"           # how it is served (planner/modes.py)
    shared_cores: bool = False          # adaptive plus a decode instance on each prefill's cores

    def __post_init__(self) -> None:
        if self.mode not in SERVE_MODES or (self.mode == "colocated") != (self.decode is None):
            raise ValueError(f"a placement {'without' if self.decode is None else 'with'} decode "
                             f"instances cannot be served as {self.mode!r}")
        if self.shared_cores and self.mode != "adaptive":
            raise ValueError(f"decode instances on prefill's cores are served adaptive, not {self.mode!r}")

    @property
    def label(self) -> str:
        """How it is served, as the planner names it (planner.modes.PLAN_MODES)."""
        return "adaptive-shared" if self.shared_cores else self.mode

    @property
    def per_device(self) -> float:
        return self.goodput / self.num_devices if self.num_devices else 0.0


Search = tuple[SimConfig, float, float]      # config, first guess, bracketing step
PhaseKey = tuple[str, int, int]              # ("prefill" | "decode", tp, pp)


class Planner:
    """Goodput searches for one workload, SLO and cluster, memoised: each (phase, tp, pp) is
    searched once and each (config, rate) probed once; independent searches run in
    `space.workers` processes (the same results: every search is seeded). `num_sims` counts
    the simulations run, in those processes too."""

    def __init__(self, space: SearchSpace, lengths: Sequence[tuple[int, int]], slo: SLO,
                 cluster: Cluster) -> None:
        self.space, self.slo, self.cluster = space, slo, cluster
        self.lengths = list(lengths)
        self.num_sims = 0
        self._probes: dict[tuple, float] = {}
        self._phases: dict[PhaseKey, PhaseChoice | None] = {}

    def probe(self, config: SimConfig, scale: int = 1, verify: bool = False) -> Probe:
        """A counted, memoised probe; `scale` multiplies the request counts (for many instances).
        `verify`: the shorter window of a whole-deployment check (`verify_lifetimes`)."""
        s = self.space
        life = lifetime(self.lengths, self.slo, config.mode)
        span = s.verify_lifetimes * life if verify else max(s.min_span_s, s.window_lifetimes * life)
        probe = make_probe(config, self.lengths, self.slo, s.seed, s.num_requests * scale, span,
                           s.max_requests * scale, s.warmup_lifetimes * life)

        def memo(rate: float) -> float:
            key = (config, scale, span, rate)
            if key not in self._probes:
                self.num_sims += 1
                self._probes[key] = probe(rate)
            return self._probes[key]
        return memo

    def search_goodput(self, config: SimConfig, guess: float, step: float = 2.0) -> float | None:
        """goodput() of one config; None if a request does not fit its KV cache."""
        try:
            return goodput(self.probe(config), self.slo.target, guess, self.space.rel_tol, step=step)
        except ValueError:
            return None

    def search_many(self, searches: Sequence[Search]) -> list[float | None]:
        """search_goodput() of each, in worker processes when there are several."""
        workers = min(self.space.workers, len(searches))
        if workers <= 1:
            return [self.search_goodput(*s) for s in searches]
        jobs = [(self.space, self.lengths, self.slo, self.cluster, s) for s in searches]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_search_job, jobs))
        self.num_sims += sum(n for _, n in results)
        return [g for g, _ in results]

    # ---- one phase alone ------------------------------------------------------------------
    def phase_spec(self, tp: int, pp: int) -> InstanceSpec | None:
        if tp > self.cluster.gpus_per_node or pp > self.cluster.num_nodes:
            return None
        return self.space.instance(self.cluster.device, tp, pp)

    def _phase_search(self, phase: str, spec: InstanceSpec) -> Search:
        """Prefill alone starts at 0.6 x its saturated throughput; decode alone at its fluid
        rate, which the simulated goodput stays close to (so a small step)."""
        if phase == "prefill":
            return SimConfig("prefill", prefill=spec), 0.6 * prefill_capacity(spec, self.lengths), 1.3
        guess = decode_fluid_rate(spec, self.lengths, self.slo)
        return SimConfig("decode", decode=spec), max(guess, 1e-3), 1.1

    def prefetch(self, keys: Sequence[PhaseKey]) -> None:
        """Search the phase goodputs not known yet (in parallel)."""
        todo = [k for k in dict.fromkeys(keys) if k not in self._phases]
        specs = {k: self.phase_spec(k[1], k[2]) for k in todo}
        runnable = [k for k in todo if specs[k] is not None]
        found = self.search_many([self._phase_search(k[0], specs[k]) for k in runnable])
        for k in todo:
            self._phases[k] = None
        for k, g in zip(runnable, found):
            self._phases[k] = None if g is None else PhaseChoice(k[1], k[2], g)

    def is_searched(self, phase: str, tp: int, pp: int) -> bool:
        return (phase, tp, pp) in self._phases

    def phase_goodput(self, phase: str, tp: int, pp: int) -> PhaseChoice | None:
        """Goodput of one (tp, pp) instance of `phase` simulated alone (None: does not fit)."""
        self.prefetch([(phase, tp, pp)])
        return self._phases[(phase, tp, pp)]

    def phase_bound(self, phase: str, tp: int, pp: int) -> float | None:
        """phase_goodput() if known; else, for decode, the fluid rate x decode_bound_margin (the
        simulated decode goodput stays below it; prefill alone is cheap, so searched)."""
        key = (phase, tp, pp)
        if key in self._phases or phase == "prefill":
            choice = self.phase_goodput(*key)
            return None if choice is None else choice.goodput
        spec = self.phase_spec(tp, pp)
        if spec is None or not fits(spec, self.lengths):
            return None
        return decode_fluid_rate(spec, self.lengths, self.slo) * self.space.decode_bound_margin

    def phase_keys(self, phase: str) -> list[PhaseKey]:
        tps = self.space.table.tps(self.space.model, self.cluster.device)
        return [(phase, tp, pp) for tp in tps for pp in self.space.pps]

    def phase_choices(self, phase: str) -> list[PhaseChoice]:
        """Every configuration of `phase` searched, best goodput per device first."""
        keys = self.phase_keys(phase)
        self.prefetch(keys)
        out = [self._phases[k] for k in keys]
        return sorted((c for c in out if c is not None and c.goodput > 0), key=_rank)

    def best_choice(self, phase: str) -> PhaseChoice | None:
        """The best configuration of `phase` by goodput per device (then fewer devices), by
        branch and bound: configurations in order of their bound per device, searched (a few
        at a time, in parallel) only while the bound can beat the best found."""
        keys = self.phase_keys(phase)
        if phase == "prefill":
            self.prefetch(keys)
        bounds = {k: self.phase_bound(*k) for k in keys}
        per_device = {k: bounds[k] / (k[1] * k[2]) for k in keys if bounds[k]}
        order = sorted(per_device, key=lambda k: -per_device[k])
        best = None
        while order:
            batch = [k for k in order[:max(1, self.space.workers)]
                     if best is None or per_device[k] > best.per_device]
            if not batch:
                break
            self.prefetch(batch)
            for k in batch:
                c = self._phases[k]
                if c is not None and c.goodput > 0 and (best is None or _rank(c) < _rank(best)):
                    best = c
            order = order[len(batch):]
        return best


def _rank(c: PhaseChoice) -> tuple[float, int]:
    return (-c.per_device, c.num_devices)


def _search_job(job: tuple) -> tuple[float | None, int]:
    """One search_goodput() in a worker process: (goodput, simulations run)."""
    space, lengths, slo, cluster, search = job
    planner = Planner(space, lengths, slo, cluster)
    return planner.search_goodput(*search), planner.num_sims

