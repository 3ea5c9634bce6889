"""Goodput: the highest request rate at which at least `target` of the requests meet both SLOs.

`search_goodput(measure, slo)` calls `measure(rate) -> list[RequestResult]` (a real replay, or
a synthetic server model in tests), so the search itself never touches the network:
1. bracket: from `start_rate`, double while attainment >= target (up to `max_rate`), or halve
   while it is below (down to `min_rate`), until one rate passes and a higher one fails;
2. bisect between them until the gap is within `rel_tol` of the failing rate or the
   measurement budget is spent.
Every rate is measured once (attainment is assumed to fall with the rate; a noisy
non-monotone point can mislead it, which is why every point is kept in the result).

SLOs are absolute (seconds) or relative: multiples of the TTFT and TPOT one request gets from
an unloaded server (`measure_baseline`), since the paper's SLOs are for A100s.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import SLO, RequestResult, attainment

Measure = Callable[[float], Sequence[RequestResult]]
DEFAULT_SCALES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


@dataclass(frozen=True)
class Point:
    rate: float
    attainment: float
    results: tuple[RequestResult, ...]


@dataclass(frozen=True)
class GoodputResult:
    goodput_rps: float                 # highest rate measured to pass (0: none passed)
    fail_rps: float | None             # lowest rate measured to fail above it (None: none failed)
    target: float
    points: tuple[Point, ...] = field(default=())   # in the order measured

    def point(self, rate: float) -> Point:
        return next(p for p in self.points if p.rate == rate)

    @property
    def is_capped(self) -> bool:
        """True when max_rate still passed: the goodput is at least goodput_rps."""
        return self.fail_rps is None and self.goodput_rps > 0


def search_goodput(measure: Measure, slo: SLO, *, target: float = 0.9, start_rate: float = 1.0,
                   min_rate: float = 0.01, max_rate: float = 1024.0, rel_tol: float = 0.05,
                   max_measurements: int = 16,
                   on_point: Callable[[Point], None] | None = None) -> GoodputResult:
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not 0 < min_rate <= start_rate <= max_rate:
        raise ValueError(f"need 0 < min_rate <= start_rate <= max_rate, got "
                         f"{min_rate}, {start_rate}, {max_rate}")
    points: list[Point] = []

    def passes(rate: float) -> bool:
        results = tuple(measure(rate))
        p = Point(rate, attainment(results, slo), results)
        points.append(p)
        if on_point is not None:
            on_point(p)
        return p.attainment >= target

    lo, hi = _bracket(passes, start_rate, min_rate, max_rate, max_measurements)
    while lo > 0 and hi is not None and hi - lo > rel_tol * hi and len(points) < max_measurements:
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, hi, target, tuple(points))


def _bracket(passes: Callable[[float], bool], rate: float, min_rate: float, max_rate: float,
             budget: int) -> tuple[float, float | None]:
    """(a passing rate or 0, the next failing rate above it or None)."""
    if passes(rate):
        used = 1
        while rate < max_rate and used < budget:
            higher = min(rate * 2, max_rate)
            used += 1
            if not passes(higher):
                return rate, higher
            rate = higher
        return rate, None
    used = 1
    while rate > min_rate and used < budget:
        lower = max(rate / 2, min_rate)
        used += 1
        if passes(lower):
            return lower, rate
        rate = lower
    return 0.0, rate


def sweep(results: Sequence[RequestResult], slo: SLO,
          scales: Sequence[float] = DEFAULT_SCALES) -> list[dict[str, float]]:
    """Attainment at one rate as both SLOs are multiplied by each scale."""
    return [{"scale": s, "attainment": attainment(results, slo.scaled(s))} for s in scales]


@dataclass(frozen=True)
class Baseline:
    """Median latencies of requests sent one at a time to an idle server."""
    ttft_s: float
    tpot_s: float
    num_requests: int

    def slo(self, ttft_multiple: float, tpot_multiple: float) -> SLO:
        return SLO(self.ttft_s * ttft_multiple, self.tpot_s * tpot_multiple)


def baseline_from(results: Sequence[RequestResult]) -> Baseline:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    if not ttfts or not tpots:
        errors = sorted({r.error for r in results if r.error})
        raise RuntimeError(f"baseline: no request gave both a TTFT and a TPOT "
                           f"({len(ok)}/{len(results)} ok; errors: {errors[:3]})")
    return Baseline(float(np.median(ttfts)), float(np.median(tpots)), len(ok))


def measure_baseline(endpoint: str, url: str, model: str, requests: Sequence[Any],
                     timeout_s: float = 600.0, warmup: int = 1) -> Baseline:
    """Send `requests` one at a time (after `warmup` unrecorded ones) and take the medians.
    Use requests with at least two output tokens, from the workload being measured."""
    from .runner import sequential
    results = sequential(endpoint, url, model, list(requests[:warmup]) + list(requests), timeout_s)
    return baseline_from(results[warmup:])
