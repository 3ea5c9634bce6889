"""What a decode step costs by its rows, as measured on this instance: AdaptiveK's cost model
(spec_policy.py) for the step that verifies drafts against a plain one."""
from __future__ import annotations

import bisect


class StepCost:
    """Seconds of a decode step by its rows n (its tokens: decode rows + draft tokens), an EWMA
    per n of measured steps; the first step of each n is not counted (a new row count builds
    new kernels: tens of ms once). An unmeasured n: linear between measured neighbours; beyond
    them the slope of the two nearest (when it rises), else the prior curve 1 + prior_row_cost
    x (n - 1) scaled through the nearest measured step. Before any measurement, the prior
    itself (unitless: only ratios of estimates are used)."""

    def __init__(self, alpha: float = 0.2, prior_row_cost: float = 0.15) -> None:
        self.alpha = alpha
        self.prior_row_cost = prior_row_cost
        self.seconds: dict[int, float] = {}
        self._ns: list[int] = []                      # the measured n, sorted
        self._warmed: set[int] = set()

    @property
    def measured(self) -> bool:
        """Whether estimates are seconds (else the unitless prior)."""
        return bool(self._ns)

    def observe(self, n: int, seconds: float) -> None:
        if n <= 0 or not seconds > 0:
            return
        if n not in self._warmed:
            self._warmed.add(n)
            return
        old = self.seconds.get(n)
        if old is None:
            bisect.insort(self._ns, n)
            self.seconds[n] = seconds
        else:                                          # a spike moves it at most alpha x old
            self.seconds[n] = old + self.alpha * (min(seconds, 2 * old) - old)

    def _prior(self, n: int) -> float:
        return 1.0 + self.prior_row_cost * (n - 1)

    def estimate(self, n: int) -> float:
        ns, s = self._ns, self.seconds
        if not ns:
            return self._prior(n)
        if n in s:
            return s[n]
        i = bisect.bisect_left(ns, n)
        if 0 < i < len(ns):
            lo, hi = ns[i - 1], ns[i]
            return s[lo] + (s[hi] - s[lo]) * (n - lo) / (hi - lo)
        pair = ns[-2:] if i else ns[:2]                 # the two nearest measured counts
        end = pair[-1] if i else pair[0]
        a, b = pair[0], pair[-1]
        if a != b and s[b] > s[a]:
            return max(s[end] + (s[b] - s[a]) / (b - a) * (n - end), 0.1 * s[end])
        return s[end] * self._prior(n) / self._prior(end)
