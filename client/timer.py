"""Client-side latency of one request, measured on the caller's clock.

Definitions (all in seconds, all from `perf_counter` unless a clock is injected):
- start: just before the request is sent (after argument checks, before connecting).
- TTFT: start -> the first chunk that carries tokens (non-empty text or token ids). Chunks
  without either (e.g. a held-back partial UTF-8 character when token ids are not returned,
  or the empty final response) do not count. For a non-streamed request the first such chunk
  is the whole answer, so TTFT equals E2E.
- TPOT: (t_last - t_first) / (num_token_chunks - 1), where t_first / t_last are the arrival
  times of the first / last chunk carrying tokens. It is per *chunk*: the server may put more
  than one token in a chunk (a multi-token decode step, held-back UTF-8 or stop-string text),
  so with `return_token_ids` compare with the server's `tpot_s`, which is per token.
  None with fewer than two token chunks.
- E2E: start -> the stream ended (last response received).
"""
from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class ClientTimer:
    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.t_start = clock()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.t_end: float | None = None
        self.num_chunks = 0
        self.num_token_chunks = 0

    def observe(self, has_tokens: bool) -> None:
        """A chunk arrived now."""
        self.num_chunks += 1
        if not has_tokens:
            return
        now = self.clock()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.num_token_chunks += 1

    def finish(self) -> None:
        """The stream ended now (idempotent: the first call counts)."""
        if self.t_end is None:
            self.t_end = self.clock()

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def tpot_s(self) -> float | None:
        if self.num_token_chunks < 2:
            return None
        return (self.t_last - self.t_first) / (self.num_token_chunks - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start
