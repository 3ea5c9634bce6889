"""Replay a workload against an endpoint: open loop, streaming, one asyncio task per request.

Lifecycle of a run: every request waits for its scheduled arrival (seconds after the start of
the run), is sent whatever the state of earlier requests (open loop, as the paper's clients),
and its stream is read to the end, stamping each response on the client's clock (see
client.bench.metrics for the definitions). A request that errors, or is not done within
`timeout_s` of being sent, is recorded as failed (the connection is closed, which cancels it
on the server); none is dropped. Results come back in workload order.
"""
from __future__ import annotations

import asyncio
import atexit
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from .endpoints import Endpoint, make_endpoint
from .metrics import RequestResult, Timeline
from .pools import Request

Clock = Callable[[], float]
T = TypeVar("T")
_loop: asyncio.Runner | None = None
_loop_lock = threading.Lock()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on this process's one benchmark loop (made on first use, closed at
    exit), as `asyncio.run` would. One loop for every measurement, not one each: grpc.aio binds
    the loop a channel is made on, and a late completion of a closed channel's call (a timed-out
    stream's pending reads) is handed to that loop; with a loop a measurement it was closed by
    then, and the next measurement's loop printed "RuntimeError: Event loop is closed"
    (client/grpc_stream.py)."""
    global _loop
    with _loop_lock:                        # one measurement at a time: callers on threads wait
        if _loop is None:
            _loop = asyncio.Runner()
            atexit.register(_loop.close)
        return _loop.run(coro)


async def replay_async(endpoint: Endpoint, requests: Sequence[Request], arrivals: Sequence[float],
                       *, timeout_s: float = 600.0, progress: bool = True, desc: str = "",
                       clock: Clock = time.perf_counter) -> list[RequestResult]:
    """Send requests[i] at arrivals[i] s after the start; the endpoint must be open."""
    if len(requests) != len(arrivals):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    from tqdm.auto import tqdm
    t0 = clock()
    now = lambda: clock() - t0                              # noqa: E731
    failed = 0
    with tqdm(total=len(requests), desc=desc or endpoint.name, unit="req", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        async def one(index: int) -> RequestResult:
            nonlocal failed
            await asyncio.sleep(max(0.0, arrivals[index] - now()))
            result = await run_one(endpoint, requests[index], index, arrivals[index], now, timeout_s)
            failed += not result.ok
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            return result
        return list(await asyncio.gather(*(one(i) for i in range(len(requests)))))


async def run_one(endpoint: Endpoint, req: Request, index: int, arrival_s: float,
                  now: Clock, timeout_s: float) -> RequestResult:
    """One request, sent now; every outcome becomes a RequestResult."""
    timeline = Timeline(index, req.prompt_len, req.output_len, arrival_s)
    timeline.sent(now())
    try:
        await asyncio.wait_for(_read(endpoint, req, timeline, now), timeout_s)
        timeline.finished(now())
    except asyncio.TimeoutError:
        timeline.finished(now(), f"timeout: not done {timeout_s:g} s after it was sent")
    except Exception as e:                       # noqa: BLE001 - any failure is a result
        timeline.finished(now(), f"{type(e).__name__}: {e}".strip())
    return timeline.result()


async def _read(endpoint: Endpoint, req: Request, timeline: Timeline, now: Clock) -> None:
    async for event in endpoint.stream(req):
        timeline.tokens(now(), event.num_tokens)
        if event.finish_reason is not None:
            timeline.finish_reason = event.finish_reason
        if event.total_tokens:
            timeline.reported(event.total_tokens)
        if event.timing is not None:
            timeline.server_timing = event.timing


async def sequential_async(endpoint: Endpoint, requests: Sequence[Request],
                           timeout_s: float = 600.0) -> list[RequestResult]:
    """One request at a time, each sent when the previous one is done (an unloaded server)."""
    loop_start = time.perf_counter()
    now = lambda: time.perf_counter() - loop_start          # noqa: E731
    results = []
    for i, req in enumerate(requests):
        results.append(await run_one(endpoint, req, i, now(), now, timeout_s))
    return results


def replay(endpoint: str, url: str, model: str, requests: Sequence[Request],
           arrivals: Sequence[float], *, timeout_s: float = 600.0, warmup: Sequence[Request] = (),
           progress: bool = True, desc: str = "") -> list[RequestResult]:
    """Open the endpoint, send the warm-up requests one by one (not recorded), then replay."""
    async def main() -> list[RequestResult]:
        async with make_endpoint(endpoint, url, model) as ep:
            if warmup:
                await sequential_async(ep, warmup, timeout_s)
            return await replay_async(ep, requests, arrivals, timeout_s=timeout_s,
                                      progress=progress, desc=desc)
    return run_sync(main())


def sequential(endpoint: str, url: str, model: str, requests: Sequence[Request],
               timeout_s: float = 600.0) -> list[RequestResult]:
    async def main() -> list[RequestResult]:
        async with make_endpoint(endpoint, url, model) as ep:
            return await sequential_async(ep, requests, timeout_s)
    return run_sync(main())
