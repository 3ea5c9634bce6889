"""What a decode step costs by its rows, and what a drafting call costs, as measured on this
instance: AdaptiveK's cost models (spec_policy.py) for the step that verifies drafts against a
plain one, and for the drafter's own time."""
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


BACKLOG_FREE = 8                  # backlog tokens a sequence asked every step brings (its accepted
                                  # drafts and the target's token): a call within it times k


class DraftingCost:
    """Seconds of a drafting call, k x token_s + backlog x backlog_s: per token of k (the most
    asked of any sequence) and per backlog token (its sequences' tokens the drafter had not seen:
    a draft model computes them first; a new sequence's whole prompt, an idle one's tokens since
    it was last asked), both EWMAs of the timed calls. A call within BACKLOG_FREE tokens a
    sequence (every step's) times k, its backlog's predicted part taken off; a larger one times
    the backlog by its excess over k's part (all of it while k's is unknown)."""

    def __init__(self) -> None:
        self.token_s: float | None = None
        self.backlog_s: float | None = None

    def observe(self, k: int, seconds: float, backlog: int = 0, num_seqs: int = 1) -> None:
        if k <= 0 or not seconds >= 0:
            return
        if backlog <= BACKLOG_FREE * max(num_seqs, 1):
            rest = seconds - backlog * (self.backlog_s or 0.0)
            self.token_s = _ewma(self.token_s, max(rest, 0.0) / k)
        else:
            rest = seconds - k * (self.token_s or 0.0)
            self.backlog_s = _ewma(self.backlog_s, max(rest, 0.0) / backlog)

    def predict(self, k: int, backlog: int = 0) -> float:
        return k * (self.token_s or 0.0) + backlog * (self.backlog_s or 0.0)


def _ewma(old: float | None, sample: float) -> float:
    """A drafting rate's EWMA: a sample moves it a fifth of the way (a spike counts as 4x old
    at most: a pass that built new kernels); the first sample, or one after a 0, is taken whole."""
    return sample if not old else old + 0.2 * (min(sample, 4 * old) - old)
