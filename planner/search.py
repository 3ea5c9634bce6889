"""Goodput search and DistServe's two placement algorithms.

goodput(sim config) = the highest Poisson rate at which >= `target` of requests meet both SLOs,
found by bracketing then bisecting the rate, one seeded simulation per probe.

High node-affinity (the paper's Algorithm 1): the best (tp, pp) per phase by its own goodput per
device (prefill simulated alone, decode simulated alone), then replicate the two to fill the
cluster: n = ceil(R / prefill goodput), m = ceil(R / decode goodput).
Low node-affinity (Algorithm 2): both phases share pp; stage k of every instance of a unit sits
on node k, so KV moves over the node's fast link. A unit is n_p prefill (tp_p) + n_d decode
(tp_d) instances with n_p * tp_p + n_d * tp_d <= GPUs per node. Units are ranked by the
per-phase goodputs (min(n_p * g_p, n_d * g_d)), the best few are simulated whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Literal, Sequence

from planner.latency import ETHERNET_25G, NVLINK_A100, LatencyTable, Link, model_key
from planner.simulator import InstanceSpec, SimConfig, simulate


@dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float
    target: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft <= 0 or self.tpot <= 0 or not 0 < self.target <= 1:
            raise ValueError(f"bad SLO {self}")


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
    """What the planner may choose, and the simulation budget per probe."""
    model: str
    table: LatencyTable
    capacity: dict[tuple[str, int, int], int]       # KV tokens per (model, tp, pp)
    pps: tuple[int, ...] = (1, 2, 4)
    block_size: int = 16
    max_num_seqs: int = 256
    prefill_budget: int = 2048                       # L_m
    kv_bytes_per_token: float = 0.0
    num_requests: int = 300                          # at least this many per probe...
    min_span_s: float = 60.0                         # ...and arrivals over at least this long
    max_requests: int = 6000
    seed: int = 0
    rel_tol: float = 0.04

    def instance(self, device: str, tp: int, pp: int, table: LatencyTable | None = None,
                 max_num_seqs: int | None = None) -> InstanceSpec | None:
        """The instance spec, or None when (tp, pp) has no latency model or does not fit."""
        tokens = self.capacity.get((model_key(self.model), tp, pp))
        try:
            lat = (table or self.table).get(self.model, device, tp, pp)
        except KeyError:
            return None
        if tokens is None:
            return None
        return InstanceSpec(lat, tokens // self.block_size, max_num_seqs or self.max_num_seqs,
                            self.prefill_budget, self.block_size)


Probe = Callable[[float], float]        # rate -> attainment


def goodput(probe: Probe, target: float, guess: float = 1.0, rel_tol: float = 0.04,
            max_probes: int = 24) -> float:
    """Highest rate with probe(rate) >= target: bracket from `guess` by factors of 2, then
    bisect (geometrically) until hi / lo <= 1 + rel_tol. 0.0 if even guess / 2**8 fails."""
    lo, hi = 0.0, None
    rate, probes = guess, 0
    while probes < max_probes and (hi is None or lo == 0.0):
        ok = probe(rate) >= target
        probes += 1
        if ok:
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo > 0 or rate < guess / 256:
                break
            rate /= 2
    if hi is None:
        return lo
    while lo > 0 and hi / lo > 1 + rel_tol and probes < max_probes:
        mid = math.sqrt(lo * hi)
        if probe(mid) >= target:
            lo = mid
        else:
            hi = mid
        probes += 1
    return lo


def cycle(lengths: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """n requests from the pool, in order, wrapping around."""
    return [lengths[i % len(lengths)] for i in range(n)]


def make_probe(config: SimConfig, lengths: Sequence[tuple[int, int]], slo: SLO, seed: int,
               min_requests: int, min_span_s: float, max_requests: int) -> Probe:
    """Attainment at a rate, over enough requests that arrivals span `min_span_s` (a short
    burst of a few hundred requests hides overload at high rates)."""
    def probe(rate: float) -> float:
        n = min(max_requests, max(min_requests, math.ceil(rate * min_span_s)))
        stop = (slo.ttft, slo.tpot, slo.target)
        res = simulate(config, cycle(lengths, n), rate, seed, stop_below=stop)
        return res.attainment(slo.ttft, slo.tpot)
    return probe


def decode_guess(spec: InstanceSpec, lengths: Sequence[tuple[int, int]], slo: SLO) -> float:
    """Rate at which a decode batch just meets the TPOT SLO (Little's law), a search start."""
    mean_out = sum(o for _, o in lengths) / len(lengths)
    mean_ctx = sum(p + o / 2 for p, o in lengths) / len(lengths)
    best = 0.0
    for b in range(1, spec.max_num_seqs + 1):
        t = spec.latency.decode_time(b, int(b * mean_ctx))
        if t > slo.tpot or b * mean_ctx > spec.num_kv_blocks * spec.block_size:
            break
        best = b / t / mean_out
    return max(best, 0.01)


def prefill_guess(spec: InstanceSpec, lengths: Sequence[tuple[int, int]]) -> float:
    mean_t = sum(spec.latency.prefill_time([p]) for p, _ in lengths) / len(lengths)
    return 0.7 / mean_t


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

    @property
    def per_device(self) -> float:
        return self.goodput / self.num_devices if self.num_devices else 0.0


class Planner:
    """Caches per-phase goodputs so both algorithms and the report share them."""

    def __init__(self, space: SearchSpace, lengths: Sequence[tuple[int, int]], slo: SLO,
                 cluster: Cluster) -> None:
        self.space, self.slo, self.cluster = space, slo, cluster
        self.lengths = list(lengths)
        self.num_sims = 0
        self.phase_goodput = lru_cache(maxsize=None)(self._phase_goodput)

    def probe(self, config: SimConfig, scale: int = 1) -> Probe:
        """A counted probe; `scale` multiplies the request counts (for many instances)."""
        s = self.space
        probe = make_probe(config, self.lengths, self.slo, s.seed, s.num_requests * scale,
                           s.min_span_s, s.max_requests * scale)

        def counted(rate: float) -> float:
            self.num_sims += 1
            return probe(rate)
        return counted

    def _goodput(self, config: SimConfig, guess: float) -> float:
        return goodput(self.probe(config), self.slo.target, guess, self.space.rel_tol)

    def _phase_goodput(self, phase: str, tp: int, pp: int) -> PhaseChoice | None:
        spec = self.space.instance(self.cluster.device, tp, pp)
        if spec is None or tp > self.cluster.gpus_per_node or pp > self.cluster.num_nodes:
            return None
        try:
            if phase == "prefill":
                cfg = SimConfig("prefill", prefill=spec)
                guess = prefill_guess(spec, self.lengths)
            else:
                cfg = SimConfig("decode", decode=spec)
                guess = decode_guess(spec, self.lengths, self.slo)
            return PhaseChoice(tp, pp, self._goodput(cfg, guess))
        except ValueError:                          # a request does not fit this instance
            return None

    def phase_choices(self, phase: str) -> list[PhaseChoice]:
        out = [self.phase_goodput(phase, tp, pp) for tp in self.space.table.tps(self.space.model,
                                                                               self.cluster.device)
               for pp in self.space.pps]
        return sorted((c for c in out if c is not None and c.goodput > 0),
                      key=lambda c: (-c.per_device, c.num_devices))
