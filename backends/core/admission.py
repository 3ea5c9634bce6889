"""Early rejection at the instance that prefills: a bounded queue, sized by predicted waiting.

    backlog = Backlog()                          # per instance; thread-safe
    policy = AdmissionPolicy(max_wait_s=12.0, max_queued=256)
    policy.check(backlog, prompt_len, "prefill-0")   # any thread: raises Overloaded, or admits
    backlog.add(prompt_len)                      # accepted: its prompt is now queued work
    backlog.observe(tokens, seconds)             # the step thread, after each step that prefilled
    backlog.done(prompt_len)                     # its first token is out, or it left unprefilled

A request whose first token this instance would predictably not reach within `max_wait_s`
(the prompt tokens queued ahead of it, plus its own, at the prefill rate measured over recent
steps) is refused at once with `Overloaded` instead of waiting past its deadline (Mooncake's
early rejection). Until a rate is measured only the queue-length bound applies. Pure policy:
no clock, no Triton; the worker feeds it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

OVERLOADED = "overloaded"          # the error code a refused request carries (Failed.code)


class Overloaded(ValueError):
    code = OVERLOADED


class Backlog:
    """Prompt tokens (and requests) accepted by an instance and not yet prefilled, and its
    prefill speed: a line t = a + b * tokens fitted to recent steps (weighted sums decayed per
    step, so it follows the recent mix of prompt lengths): a per-step cost `a` and a per-token
    cost `b`. A ratio alone would take a 2-token warm-up step's 0.1 s as 20 tokens/s."""

    ratio_min_tokens = 256          # mean prompt tokens per step for a plain ratio to stand in

    def __init__(self, decay: float = 0.8) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._lock = threading.Lock()
        self.tokens = 0
        self.requests = 0
        self._s = [0.0] * 5                     # decayed sums: n, x, y, xx, xy

    def add(self, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens
            self.requests += 1

    def done(self, tokens: int) -> None:
        with self._lock:
            self.tokens -= tokens
            self.requests -= 1

    def observe(self, tokens: int, seconds: float) -> None:
        """A step that ran while prompts waited here and computed `tokens` prompt tokens (0: it
        made no prefill progress, e.g. a decode-only step)."""
        if seconds <= 0:
            return
        with self._lock:
            x, y, d = float(tokens), float(seconds), self.decay
            self._s = [d * v + w for v, w in zip(self._s, (1.0, x, y, x * x, x * y))]

    def _line(self) -> tuple[float, float] | None:
        """(a, b) of t = a + b * tokens, or None before a step prefilled anything."""
        n, sx, sy, sxx, sxy = self._s
        if sx <= 0:
            return None
        spread = n * sxx - sx * sx
        if spread > 1e-9 * n * sxx:            # steps of different sizes: fit both
            b = (n * sxy - sx * sy) / spread
            a = (sy - b * sx) / n
            if b > 0 and a >= 0:
                return a, b
        if sx / n >= self.ratio_min_tokens:     # one size seen (or a fit out of shape), but
            return 0.0, sy / sx                 # steps large enough that a ratio holds
        return None                             # small steps only: no evidence yet

    @property
    def rate(self) -> float | None:
        """Marginal prompt tokens per second (1 / b); None before any step prefilled."""
        line = self._line()
        return None if line is None or line[1] <= 0 else 1.0 / line[1]

    def predicted_wait(self, extra_tokens: int) -> float | None:
        """Seconds until a request of `extra_tokens` joining now has its first token (the
        queue ahead and it as one more step's worth of work)."""
        line = self._line()
        return None if line is None else line[0] + line[1] * (self.tokens + extra_tokens)


@dataclass(frozen=True)
class AdmissionPolicy:
    max_wait_s: float | None = None     # None: never refuse for predicted waiting
    max_queued: int = 1024              # requests accepted and not yet prefilled

    def __post_init__(self) -> None:
        if self.max_wait_s is not None and not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0 or None, got {self.max_wait_s}")
        if self.max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {self.max_queued}")

    def check(self, backlog: Backlog, prompt_len: int, instance_id: str = "") -> None:
        """Raise Overloaded (the message says why and by how much) unless a request of
        `prompt_len` tokens may join `backlog`."""
        who = instance_id or "the instance"
        if backlog.requests >= self.max_queued:
            raise Overloaded(f"overloaded: {who} has {backlog.requests} requests waiting for "
                             f"prefill (the bound is {self.max_queued}); retry later")
        if self.max_wait_s is None:
            return
        wait = backlog.predicted_wait(prompt_len)
        if wait is not None and wait > self.max_wait_s:
            when = f"about {wait:.1f} s" if wait < 3600 else "more than an hour"
            raise Overloaded(f"overloaded: {who} would reach this request's first token in {when} "
                             f"({backlog.tokens} prompt tokens queued ahead at "
                             f"{_rate(backlog.rate)} tokens/s over its recent steps), over the "
                             f"{self.max_wait_s:g} s limit; retry later")


def _rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
