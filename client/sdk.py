"""DistServeClient: generate or stream text from the `distserve` model over HTTP or gRPC.

    from client import DistServeClient
    client = DistServeClient("127.0.0.1:8000")                  # or protocol="grpc" (port 8001)
    print(client.generate("Hello", max_tokens=32).text)        # one response, stream=false
    with client.stream("Hello", max_tokens=32) as stream:      # one chunk per new text piece
        for chunk in stream:
            print(chunk.text, end="", flush=True)
    print(stream.ttft_s, stream.tpot_s)                         # client-measured (client.timer)

Leaving a stream early (break, an exception, `cancel()`, or the `with` block's end) cancels
the request on the server. Errors of any kind raise DistServeError with the server's message.
`timeout` bounds every wait for the server (connecting, and each response), so no call hangs.
"""
from __future__ import annotations

import time
from typing import Any

from deploy.contract import DISTSERVE, Timing

from .grpc_stream import GrpcStream
from .http_stream import HttpStream
from .request import build_inputs
from .results import Chunk, Completion, DistServeError
from .timer import ClientTimer, Clock

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


class Stream:
    """The chunks of one request, as they arrive; also a context manager that cancels the
    request if it has not finished. After the end: `collect()` / the timing properties."""

    def __init__(self, transport: HttpStream | GrpcStream, timer: ClientTimer) -> None:
        self._transport = transport
        self._timer = timer
        self._chunks = iter(transport)
        self._texts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.timing: Timing | None = None             # server-reported (return_timing)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        try:
            chunk = next(self._chunks)
        except BaseException:                          # StopIteration, DistServeError, ...
            self._timer.finish()
            raise
        self._timer.observe(chunk.has_tokens)
        self._texts.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.timing = chunk.timing if chunk.timing is not None else self.timing
        return chunk

    def cancel(self) -> None:
        """Abort the request on the server (safe from any thread, and after the end)."""
        self._transport.cancel()
        self._timer.finish()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def collect(self) -> Completion:
        """Read the rest of the stream; everything received, as one Completion."""
        for _ in self:
            pass
        return Completion("".join(self._texts), self.token_ids, self.finish_reason, self.timing,
                          ttft_s=self.ttft_s, e2e_s=self.e2e_s, tpot_s=self.tpot_s,
                          num_chunks=self._timer.num_chunks)

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def ttft_s(self) -> float | None:
        return self._timer.ttft_s

    @property
    def tpot_s(self) -> float | None:
        return self._timer.tpot_s

    @property
    def e2e_s(self) -> float | None:
        return self._timer.e2e_s


class DistServeClient:
    """Args:
        url: "host:port" of Triton's HTTP or gRPC endpoint (default 127.0.0.1:8000 for http,
            127.0.0.1:8001 for grpc); "http://" is accepted too.
        protocol: "http" (generate / generate_stream) or "grpc" (a bidirectional stream).
        model: the model to call.
        timeout: seconds to wait for the server at each step (connect, each response).
        clock: the clock of the client-side timings (tests inject a fake one).
    """

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = DISTSERVE,
                 timeout: float = 120.0, clock: Clock = time.perf_counter) -> None:
        if protocol not in DEFAULT_PORTS:
            raise ValueError(f"protocol must be one of {sorted(DEFAULT_PORTS)}, got {protocol!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
        if protocol == "grpc":
            self.url = self.url.split("://", 1)[-1].rstrip("/")
        self.protocol, self.model, self.timeout, self.clock = protocol, model, float(timeout), clock

    def generate(self, prompt: str | None = None, **options: Any) -> Completion:
        """The whole completion in one response (`stream` false). Its client TTFT is its E2E;
        for a real TTFT use `stream(...)` (and `.collect()` for a Completion).

        `options`: the keyword arguments of client.request.build_inputs (messages, input_ids,
        max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, min_tokens,
        repetition_penalty, presence_penalty, frequency_penalty, bad_words, return_token_ids,
        return_timing, slo_ttft_s, slo_tpot_s); left out or None, the server's defaults apply
        (docs/api.md). `slo_ttft_s` / `slo_tpot_s` are this request's SLOs for an adaptive
        deployment's router (default: the deployment's). TypeError for an unknown option or a
        value of the wrong type."""
        with self._open(build_inputs(prompt, **options, stream=False)) as stream:
            return stream.collect()               # cancelled if anything interrupts it

    def stream(self, prompt: str | None = None, **options: Any) -> Stream:
        """Send the request now; iterate the returned Stream for one Chunk per new text piece
        (the last one carries finish_reason, and timing with return_timing). `options`: as
        `generate`'s."""
        return self._open(build_inputs(prompt, **options, stream=True))

    def _open(self, values: dict[str, Any]) -> Stream:
        timer = ClientTimer(self.clock)
        if self.protocol == "http":
            return Stream(HttpStream(self.url, self.model, values, self.timeout), timer)
        return Stream(GrpcStream(self.url, self.model, values, self.timeout), timer)

    def __enter__(self) -> DistServeClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass                    # nothing is held between requests: each opens its own connection

    def __repr__(self) -> str:
        return f"DistServeClient({self.url!r}, protocol={self.protocol!r}, model={self.model!r})"


__all__ = ["Chunk", "Completion", "DistServeClient", "DistServeError", "Stream"]
