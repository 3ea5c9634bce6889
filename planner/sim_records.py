"""What the simulator takes and gives back: requests, per-request records and a run's result,
and the arrival processes that make request streams (trace or Poisson)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence as Seq

import numpy as np


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
    route: str | None = None            # adaptive mode: "split" or "local", as the router chose
    routed_at: float | None = None      # when it was routed (later than arrival after a "wait")
    decision: Any = None                # the router's backends.core.router.Decision

    @property
    def ttft(self) -> float:
        return self.first_token - self.req.arrival

    @property
    def tpot(self) -> float:
        n = self.req.output_len
        return (self.finish - self.first_token) / (n - 1) if n > 1 else 0.0

    def meets(self, ttft: float, tpot: float) -> bool:
        return self.ttft <= ttft and self.tpot <= tpot


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

    def routes(self) -> dict[str, int]:
        """Adaptive mode: how many measured requests the router sent each way ("split",
        "local"), and how many it held first ("waited")."""
        counts = Counter(r.route for r in self.measured if r.route is not None)
        counts["waited"] = sum(r.routed_at is not None and r.routed_at > r.req.arrival
                               for r in self.measured)
        return {"split": counts["split"], "local": counts["local"], "waited": counts["waited"]}


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
