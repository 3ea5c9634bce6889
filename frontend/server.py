"""Serving the app with uvicorn: in the foreground (`python -m frontend`) or in a thread beside
Triton (`python -m deploy serve`).

The listening socket is bound when the FrontendServer is made, so a port in use fails at once
(OSError), before anything else starts; port 0 takes a free one (`port` says which).
`start()` serves in a daemon thread of this process and returns once uvicorn accepts
connections; `stop()` asks uvicorn to finish (streams still open after `grace_s` are cancelled,
which cancels their requests on Triton) and waits for the thread. uvicorn logs each stream it
cancels so as an "Exception in ASGI application" with a traceback; that report is dropped.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

GRACE_S = 5                      # open streams get this long to finish when stopping


class FrontendError(RuntimeError):
    """The front end could not start serving."""


class FrontendServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, grace_s: float = GRACE_S) -> None:
        import uvicorn
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.host, self.port, self.grace_s = host, self.socket.getsockname()[1], grace_s
        config = uvicorn.Config(app, loop="asyncio", http="h11", lifespan="on", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=grace_s)
        _quiet_cancelled(logging.getLogger("uvicorn.error"))   # after Config: it sets logging up
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API's base URL, as OpenAI clients take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def run(self) -> None:
        """Serve in this thread until SIGINT / SIGTERM (uvicorn's own handlers)."""
        self._server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> FrontendServer:
        """Serve in a thread; return once connections are accepted."""
        self._thread = threading.Thread(target=self.run, name="openai-frontend", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FrontendError(f"the OpenAI front end did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call more than once)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.grace_s + 10.0)
        self.socket.close()


class _DropCancelled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is not None
                    and issubclass(record.exc_info[0], asyncio.CancelledError))


def _quiet_cancelled(logger: logging.Logger) -> None:
    if not any(isinstance(f, _DropCancelled) for f in logger.filters):
        logger.addFilter(_DropCancelled())
