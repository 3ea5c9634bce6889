"""SLO attainment and the rate search for one simulated config: goodput() brackets then bisects
the Poisson rate, one seeded probe (make_probe) per rate; plus the cheap rate estimates that
seed and bound it (prefill_capacity, decode_fluid_rate). planner.search builds on these.

goodput(sim config) = the highest Poisson rate at which >= `target` of requests meet both SLOs,
found by bracketing then bisecting the rate, one seeded simulation per probe. A probe measures
steady state: a warm-up of one request lifetime is simulated but not counted, and the counted
window lasts several lifetimes (SearchSpace). Counting from an empty system reads a decode
batch that has not filled yet as capacity: with ShareGPT's ~340-token outputs, a 30 s run
doubled the decode goodput that long runs sustain (docs/planner_paper_check.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from planner.simulator import InstanceSpec, SimConfig, simulate


@dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float
    target: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft <= 0 or self.tpot <= 0 or not 0 < self.target <= 1:
            raise ValueError(f"bad SLO {self}")


Probe = Callable[[float], float]        # rate -> attainment


def goodput(probe: Probe, target: float, guess: float = 1.0, rel_tol: float = 0.04,
            max_probes: int = 24, step: float = 2.0, max_rate: float = math.inf) -> float:
    """Highest rate (at most `max_rate`) with probe(rate) >= target: bracket from `guess` by a
    factor that squares after every move (step, step^2, step^4...: a good guess costs few
    probes, a bad one few more), then bisect geometrically until hi / lo <= 1 + rel_tol.
    0.0 if even guess / 256 fails."""
    lo, hi = 0.0, None
    rate, factor, probes = min(guess, max_rate), step, 0
    while probes < max_probes:
        ok = probe(rate) >= target
        probes += 1
        if ok:
            lo = rate
            if hi is not None or rate >= max_rate:
                break
            rate = min(rate * factor, max_rate)
        else:
            hi = rate
            if lo > 0 or rate < guess / 256:
                break
            rate /= factor
        factor *= factor
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
               min_requests: int, min_span_s: float, max_requests: int,
               warmup_s: float = 0.0) -> Probe:
    """Attainment at a rate: `warmup_s` of arrivals that load the system uncounted, then the
    measured requests, arriving over at least `min_span_s` (a short burst hides overload), at
    least `min_requests` and at most `max_requests` of them."""
    stop = (slo.ttft, slo.tpot, slo.target)

    def probe(rate: float) -> float:
        measured = min(max_requests, max(min_requests, math.ceil(rate * min_span_s)))
        n = math.ceil(rate * warmup_s) + measured
        res = simulate(config, cycle(lengths, n), rate, seed, stop_below=stop,
                       window=(warmup_s, math.inf))
        return res.attainment(slo.ttft, slo.tpot)
    return probe


def lifetime(lengths: Sequence[tuple[int, int]], slo: SLO, mode: str) -> float:
    """The longest a request may live and meet both SLOs: TTFT + its decode steps x TPOT on
    average (TTFT alone for prefill simulated alone)."""
    if mode == "prefill":
        return slo.ttft
    return slo.ttft + slo.tpot * sum(o - 1 for _, o in lengths) / len(lengths)


def fits(spec: InstanceSpec, lengths: Sequence[tuple[int, int]]) -> bool:
    """Every request's whole sequence fits the instance's KV cache."""
    return spec.blocks_for(max(p + o for p, o in lengths)) <= spec.limits.num_kv_blocks


def prefill_capacity(spec: InstanceSpec, lengths: Sequence[tuple[int, int]]) -> float:
    """Requests/s of prefill alone when saturated: the pool's prompts batched in order under the
    token budget (and the batch cap), one batch per stage time. The goodput lies below it (a
    queue that long breaks TTFT): 0.36-0.88 of it on the ShareGPT workloads."""
    lat, budget = spec.latency, spec.limits.max_num_batched_tokens
    total, batch, used = 0.0, [], 0
    for p, _ in lengths:
        if batch and (used + p > budget or len(batch) >= spec.limits.max_num_seqs):
            total += lat.prefill_time(batch)
            batch, used = [], 0
        batch.append(p)
        used += p
    return len(lengths) / (total + lat.prefill_time(batch))


def decode_fluid_rate(spec: InstanceSpec, lengths: Sequence[tuple[int, int]], slo: SLO) -> float:
    """The highest rate one decode instance sustains in a fluid (mean-value) model. Every
    running sequence of a (virtual) engine steps together; a request takes O = E[o - 1] steps
    over contexts summing to K = E[(o - 1) p + (o - 1) o / 2], so by Little's law an engine
    fed R requests/s batches B = R O T and caches R K T tokens, and its step time
    T = a + b R K T + c B solves to T = a / (1 - R (b K + c O)). At pp > 1 each of the pp
    virtual engines gets R / pp and steps in pp stage times (the coefficients at pp 1), and
    they share the cache. Feasible while T <= TPOT, the cache holds every engine's tokens
    (plus half a block per sequence) and B <= max_num_seqs. Past the memory limit the real
    scheduler preempts and recomputes and the queue grows without bound, however long a
    finite run takes to show it. Speculating (spec.speculation: y tokens a verify row of
    1 + k rows), a request takes O / y steps, each of its rows reads its context, and a step may
    take TPOT x y. A search start and a bound for pruning, not a result."""
    lat = spec.latency
    pp = lat.pp
    y, rows = (spec.speculation.tokens_per_step, 1 + spec.speculation.k) if spec.speculation else (1.0, 1)
    num_steps = sum(o - 1 for _, o in lengths) / len(lengths) / y
    ctx_steps = sum((o - 1) * p + (o - 1) * o / 2 for p, o in lengths) / len(lengths) / y
    cache = spec.limits.num_kv_blocks * spec.limits.block_size
    regimes = [tuple(v * pp for v in lat.decode_coeffs(bs)) for bs in (1, lat.decode_threshold)]

    def step_time(rate: float) -> float:
        t = math.inf
        for i, (a, b, c) in enumerate(regimes):
            den = 1 - rate * rows * (b * ctx_steps + c * num_steps)
            t = a / den if den > 0 else math.inf
            if i == 0 and rate * num_steps * rows * t < lat.decode_threshold:
                break
        return t

    def feasible(rate: float) -> bool:
        t = step_time(rate / pp)
        return (t <= slo.tpot * y and rate / pp * num_steps * t <= spec.limits.max_num_seqs
                and rate * t * (ctx_steps + num_steps * spec.limits.block_size / 2) <= cache)

    hi = pp * max(1 / (rows * (b * ctx_steps + c * num_steps)) for _, b, c in regimes)
    return max((r for r in np.linspace(hi / 1000, hi, 1000) if feasible(r)), default=0.0)
