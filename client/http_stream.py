"""One request over Triton's HTTP `generate` (one JSON answer) or `generate_stream` (SSE).

Lifecycle: `HttpStream(...)` connects and sends the request at once (so an unreachable server
fails right there) -> iterating reads the answer, one Chunk per response -> `cancel()` shuts the
socket down from any thread, which Triton sees as a client disconnect (the request is
cancelled server-side) -> iteration then ends quietly. Every socket wait is bounded by
`timeout`, so a silent server raises DistServeError instead of hanging.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

from .request import http_body
from .results import Chunk, DistServeError, chunk_from_json, unreachable
from .sse import iter_sse_data, iter_sse_events


def split_url(url: str, default_port: int = 8000) -> tuple[str, int]:
    """"host:port", "http://host:port/" or "host" -> (host, port)."""
    rest = url.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or host.endswith(":"):      # no port (or a bare IPv6 address)
        return rest.strip("[]"), default_port
    return host.strip("[]"), int(port)


class HttpStream:
    def __init__(self, url: str, model: str, values: dict[str, Any], timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.is_stream = bool(values.get("stream"))
        self._cancelled = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        host, port = split_url(url)
        self._conn = http.client.HTTPConnection(host, port, timeout=timeout)
        path = f"/v2/models/{model}/" + ("generate_stream" if self.is_stream else "generate")
        try:
            self._conn.connect()
            self._sock = self._conn.sock
            self._conn.request("POST", path, body=http_body(values),
                               headers={"Content-Type": "application/json",
                                        "Accept": "text/event-stream" if self.is_stream
                                        else "application/json"})
        except ConnectionRefusedError:
            self._conn.close()
            raise unreachable(url, "connection refused") from None
        except OSError as e:
            self._conn.close()
            raise unreachable(url, _reason(e, timeout)) from None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            response = self._response = self._conn.getresponse()
            if response.status != 200:
                raise _status_error(response.status, response.read().decode("utf-8", "replace"))
            if self.is_stream:
                for event in iter_sse_events(response):
                    yield chunk_from_json(event)
            else:
                yield chunk_from_json(_json(response.read().decode("utf-8", "replace")))
        except Exception as e:
            if self._cancelled:          # cancel() from another thread closed what we read
                return
            if not isinstance(e, (OSError, http.client.HTTPException)):
                raise
            raise DistServeError(f"lost the connection to Triton at {self.url}: "
                                 f"{_reason(e, self.timeout)}",
                                 status="timeout" if isinstance(e, TimeoutError) else None) from None
        finally:
            self.close()

    def cancel(self) -> None:
        """Abort the request: Triton sees the client disconnect and cancels it. Any thread."""
        with self._lock:
            if self._sock is not None:
                self._cancelled = True
        self.close()

    def close(self) -> None:
        """Release the connection (cancelling the request if it is still running)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)      # also wakes a reader blocked in another thread
        except OSError:
            pass
        if self._response is not None:
            self._response.close()
        self._conn.close()
        sock.close()


def _reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise DistServeError(f"malformed answer from Triton: {body[:200]!r}") from None


def _status_error(status: int, body: str) -> DistServeError:
    """The server's message out of an error answer: JSON {"error": ...} or SSE data lines."""
    message = None
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        for data in iter_sse_data(body.splitlines()):
            try:
                message = json.loads(data).get("error")
            except (ValueError, AttributeError):
                continue
            if message:
                break
    return DistServeError(str(message) if message else f"HTTP {status}: {body.strip()[:200]}",
                          status=status)
