"""One request over a Triton gRPC bidirectional stream: the one implementation behind the SDK
(`GrpcStream`, synchronous) and the benchmark's triton-grpc endpoint (`GrpcChannel.stream`).

The rules, all in `GrpcChannel.stream`: the request goes out with
`triton_enable_empty_final_response` (client.request.grpc_request), so its end is always marked
-> each response with outputs becomes a Chunk (client.results.chunk_from_arrays) -> the stream
ends at the response flagged `triton_final_response`, or at the first error: an error response
(it ends the request) or a gRPC failure raise DistServeError with the server's message or the
reason ("cannot reach Triton at ...") -> with a `timeout`, each response is waited for at most
that long (DistServeError, status "timeout") -> leaving early in any way (an error, a timeout,
the task cancelled) cancels the RPC, which makes Triton cancel the request; a finished request's
stream is half-closed instead, and the server then ends the RPC.

`GrpcChannel` is one grpc.aio channel (tritonclient's protobuf stubs and InferResult), opened on
first use inside the event loop, for any number of concurrent streams (the benchmark shares one).

`GrpcStream` drives one request on its own channel, as a task on the SDK's one event loop
(`_shared_loop`: a daemon thread started on first use, never closed) that pumps chunks and errors
into a queue; `cancel()` / `close()` (any thread) cancel the task unless it is done, and the task
closes its channel before its end is queued. One loop for every stream of the process, because
grpc.aio has one completion queue per process: each channel binds the loop it is created on
(`init_grpc_aio`), and the loops stay bound until the last channel is gone (`shutdown_grpc_aio`).
A completion is run on the loop that started the operation, handed over with
`call_soon_threadsafe` by whichever bound loop reads it, and it can come after the channel was
closed (a cancelled call's pending reads, a finished call's status): with a loop per stream, that
loop was closed by then, and another stream's loop printed "RuntimeError: Event loop is closed".
The SDK's loop also keeps a grpc.aio reference of its own (`_hold_grpc_aio`), so grpc.aio is never
shut down under it, from whichever thread drops the last channel. `GrpcChannel` is best used the
same way: from one long-lived loop (the benchmark runs it in its own process's loop).
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .request import grpc_request
from .results import OUTPUTS, Chunk, DistServeError, chunk_from_arrays, unreachable

# Each channel its own connection (a local subchannel pool): with grpc's global pool, channels
# to one target share a connection, and one stream's end could close it under another
# ("Stream removed (Socket closed)" on the other stream, seen when two requests fail at once).
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1)]
_END = object()                 # queue mark: the loop thread is done


class GrpcChannel:
    """A channel to Triton's gRPC endpoint at `url` ("host:port"; "grpc://" is accepted)."""

    def __init__(self, url: str) -> None:
        self.url = url.split("://", 1)[-1].rstrip("/")
        self._channel: Any = None
        self._stub: Any = None

    async def __aenter__(self) -> GrpcChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (an RPC still open on it is cancelled)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def stream(self, model: str, values: dict[str, Any],
                     timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Send one request (client.request.build_inputs values); its chunks as they arrive."""
        done = asyncio.Event()
        request = grpc_request(model, values, uuid.uuid4().hex)
        call = self._open().ModelStreamInfer(_send_then_wait(request, done))
        finished = False
        try:
            while not finished:
                response = await self._read(call, timeout)
                finished = response is None or _is_final(response.infer_response)
                if response is None:
                    raise DistServeError(f"Triton at {self.url} ended the stream before the "
                                         "request's final response")
                if response.error_message:
                    finished = True
                    raise DistServeError(response.error_message)
                if response.infer_response.outputs:
                    yield _chunk(response.infer_response)
        finally:
            done.set()                      # half-close: the server then ends a finished RPC
            if not finished:
                call.cancel()               # Triton cancels the request

    def _open(self) -> Any:
        if self._stub is None:              # here, so that the channel joins the running loop
            import grpc
            from tritonclient.grpc import service_pb2_grpc
            self._channel = grpc.aio.insecure_channel(self.url, options=_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def _read(self, call: Any, timeout: float | None) -> Any:
        """The next response; None when the server ended the RPC."""
        import grpc
        try:
            response = await asyncio.wait_for(call.read(), timeout)
        except asyncio.TimeoutError:
            raise DistServeError(f"no response from Triton at {self.url} within {timeout:g} s",
                                 status="timeout") from None
        except grpc.RpcError as e:
            raise _rpc_error(e, self.url) from None
        return None if response is grpc.aio.EOF else response


async def _send_then_wait(request: Any, done: asyncio.Event) -> AsyncIterator[Any]:
    """The request stream: one request, then open until `done` (then half-closed)."""
    yield request
    await done.wait()


def _is_final(response: Any) -> bool:
    param = response.parameters.get("triton_final_response")
    return param is not None and param.bool_param


def _chunk(response: Any) -> Chunk:
    from tritonclient.grpc import InferResult
    result = InferResult(response)
    return chunk_from_arrays({name: result.as_numpy(name) for name in OUTPUTS})


def _rpc_error(error: Any, url: str) -> DistServeError:
    """A failed RPC (grpc.aio's AioRpcError) as a DistServeError."""
    status, message = str(error.code()), error.details() or ""
    if status == "StatusCode.UNAVAILABLE":
        return unreachable(url, "connection refused" if "refused" in message.lower()
                           else message or "unavailable")
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DistServeError(f"Triton at {url} did not answer in time: {message}", status="timeout")
    return DistServeError(message or status, status=status)


class GrpcStream:
    """The SDK's synchronous view of one request: sent at once, then iterate for its Chunks."""

    def __init__(self, url: str, model: str, values: dict[str, Any], timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = False
        # The job holds no reference to self, so a dropped stream is closed by __del__.
        self._job = _Job(_pump(GrpcChannel(url), model, values, timeout, self._queue.put),
                         self._queue.put)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while (item := self._queue.get()) is not _END and not self._cancelled:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def cancel(self) -> None:
        """Abort the request (Triton cancels it); iteration then ends quietly. Any thread."""
        self._cancelled = True
        self.close()

    def close(self) -> None:
        """Cancel the request unless it finished; wait until its channel is closed."""
        self._job.cancel()
        if threading.current_thread() is not _loop_thread:
            self._job.done.wait(self.timeout)

    def __del__(self) -> None:
        if getattr(self, "_job", None) is not None:
            self._job.cancel()


async def _pump(channel: GrpcChannel, model: str, values: dict[str, Any], timeout: float,
                put: Callable[[Any], None]) -> None:
    try:
        async with contextlib.aclosing(channel.stream(model, values, timeout)) as chunks:
            async for chunk in chunks:
                put(chunk)
    except Exception as e:                          # noqa: BLE001 - raised in the reading thread
        put(e)
    finally:
        await channel.close()


class _Job:
    """A coroutine run as a task on the shared loop: `cancel()` from any thread (only the first
    counts, so that a second one cannot interrupt the task's cleanup), `done` set and `_END`
    queued once the task is over (even one cancelled before it started)."""

    def __init__(self, coro: Any, put: Callable[[Any], None]) -> None:
        self.done = threading.Event()
        self._task: asyncio.Task | None = None
        self._cancelling = False
        self._loop = _shared_loop()
        self._loop.call_soon_threadsafe(self._start, coro, put)

    def cancel(self) -> None:
        self._loop.call_soon_threadsafe(self._cancel)   # after _start: the loop keeps the order

    def _start(self, coro: Any, put: Callable[[Any], None]) -> None:
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(lambda _: (put(_END), self.done.set()))

    def _cancel(self) -> None:
        if not self._cancelling and self._task is not None:
            self._cancelling = True
            self._task.cancel()


_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_lock = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The SDK's event loop, running in a daemon thread from the first call on, never closed."""
    global _loop, _loop_thread
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            loop.call_soon(_hold_grpc_aio)
            thread = threading.Thread(target=_serve, args=(loop,), name="distserve-grpc loop",
                                      daemon=True)
            thread.start()
            _loop, _loop_thread = loop, thread
        return _loop


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _hold_grpc_aio() -> None:
    """On the shared loop: bind it to grpc.aio, and keep grpc.aio up for the rest of the process
    (this reference is never released), so that dropping the last channel, in any thread, never
    shuts grpc.aio down under the loop (and a next stream need not start it again)."""
    try:
        import grpc.aio
        grpc.aio.init_grpc_aio()
    except Exception:                               # noqa: BLE001 - the first stream reports it
        pass
