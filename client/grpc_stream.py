"""One request over a Triton gRPC bidirectional stream (tritonclient.grpc).

Lifecycle: `GrpcStream(...)` opens its own channel, starts the stream and sends the request
with `enable_empty_final_response`, so the end is always marked -> tritonclient's stream thread
puts each (result, error) into a queue -> iterating takes them out, waiting at most `timeout`
for each, and stops at the response flagged `triton_final_response` or at the first error (an
error response ends the request) -> `close()` stops the stream, with `cancel_requests=True`
unless the request finished, which is how `cancel()` makes Triton cancel the request.

One channel per request: a tritonclient client holds a single stream at a time, and its
`close()` without cancelling blocks until every pending request is done.
"""
from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from deploy.contract import DISTSERVE_SPEC

from .request import grpc_inputs
from .results import Chunk, DistServeError, chunk_from_arrays, unreachable

_CLOSED = object()          # queue sentinel: the stream was closed locally


class GrpcStream:
    def __init__(self, url: str, model: str, values: dict[str, Any], timeout: float,
                 module: Any = None) -> None:
        self._client = None
        if module is None:
            import tritonclient.grpc as module
        self.url, self.timeout = url, timeout
        self.request_id = uuid.uuid4().hex
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._is_done = self._is_cancelled = False
        inputs = grpc_inputs(values, module)
        self._client = module.InferenceServerClient(url)
        try:
            self._client.start_stream(callback=self._on_response)
            self._client.async_stream_infer(model, inputs, request_id=self.request_id,
                                            enable_empty_final_response=True)
        except Exception as e:                      # noqa: BLE001 - tritonclient raises its own type
            raise self._failed(e) from None

    def _failed(self, e: Exception) -> DistServeError:
        """Sending failed. A stream that broke at once (server unreachable) raises "no longer
        in valid state" here while the real reason is on its way to the callback: prefer it."""
        try:
            _, error = self._queue.get(timeout=min(self.timeout, 5.0))
        except queue.Empty:
            error = None
        self._is_done = True
        self.close()
        return _error(error if error is not None else e, self.url)

    def _on_response(self, result: Any, error: Any) -> None:
        self._queue.put((result, error))

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                item = self._get()
                if item is _CLOSED or self._is_cancelled:
                    return
                result, error = item
                if error is not None:
                    self._is_done = True
                    raise _error(error, self.url)
                response = result.get_response()
                if response.outputs:
                    yield chunk_from_arrays({o.name: result.as_numpy(o.name)
                                             for o in DISTSERVE_SPEC.outputs})
                if _is_final(response):
                    self._is_done = True
                    return
        finally:
            self.close()

    def _get(self) -> Any:
        try:
            return self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise DistServeError(f"no response from Triton at {self.url} within {self.timeout:g} s",
                                 status="timeout") from None

    def cancel(self) -> None:
        """Abort the request (stop_stream(cancel_requests=True)). Any thread."""
        with self._lock:
            if self._client is not None and not self._is_done:
                self._is_cancelled = True
        self.close()

    def close(self) -> None:
        """Stop the stream and the channel; cancels the request unless it finished."""
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        try:
            client.stop_stream(cancel_requests=not self._is_done)
            client.close()
        finally:
            self._queue.put(_CLOSED)

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()


def _is_final(response: Any) -> bool:
    param = response.parameters.get("triton_final_response")
    return param is not None and param.bool_param


def _error(error: Any, url: str) -> DistServeError:
    """tritonclient's InferenceServerException (or a response error) as a DistServeError."""
    status = error.status() if hasattr(error, "status") else None
    message = error.message() if hasattr(error, "message") else str(error)
    if status == "StatusCode.UNAVAILABLE":
        reason = "connection refused" if "refused" in (message or "").lower() else (message or "unavailable")
        return unreachable(url, reason)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DistServeError(f"Triton at {url} did not answer in time: {message}", status="timeout")
    return DistServeError(message or str(error), status=status)
