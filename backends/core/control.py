"""Control channel to one engine instance: cancel a request, read its stats.

Triton cannot address a particular instance of a model, so each prefill/decode instance also
listens on a Unix socket named after its instance id, in a directory private to the user
(0700) and to this server (keyed by the tritonserver pid, the common parent of all model
stubs). The orchestrator learns a request's instances from their responses and sends
`{"op": "cancel", "req_id": ...}`; tests and benchmarks send `{"op": "stats"}`.
One JSON line in, one JSON line out, per connection.
"""
from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_LINE = 64 * 1024


def run_dir(server_pid: int | None = None) -> Path:
    """The private directory for this server's sockets (created 0700 if missing)."""
    base = Path(os.environ.get("DISTSERVE_RUN_DIR") or
                Path(tempfile.gettempdir()) / f"distserve-{os.geteuid()}")
    path = base / str(server_pid if server_pid is not None else os.getppid())
    for p in (base, path):
        p.mkdir(mode=0o700, exist_ok=True)
        st = p.stat()
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{p} is not owned by uid {os.geteuid()}")
        if st.st_mode & 0o077:
            os.chmod(p, 0o700)              # ours, but made with a looser umask
    return path


def socket_path(directory: Path, instance_id: str) -> Path:
    if not _INSTANCE_RE.match(instance_id):
        raise ValueError(f"bad instance id {instance_id!r}")
    return directory / f"{instance_id}.sock"


class ControlServer:
    """Serves `handler(message) -> reply` on a Unix socket in a background thread."""

    def __init__(self, path: Path, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        handle = self._handle

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                handle(self.rfile, self.wfile)

        self._handler = handler
        old = os.umask(0o077)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(path), _Handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()

    def _handle(self, rfile, wfile) -> None:
        line = rfile.readline(MAX_LINE)
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("message must be a JSON object")
            reply = self._handler(msg)
        except Exception as e:                  # noqa: BLE001 - the reply carries the error
            reply = {"error": str(e)}
        wfile.write(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def send(path: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request/reply on an instance's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(message).encode() + b"\n")
        with s.makefile("rb") as f:
            return json.loads(f.readline(MAX_LINE))


MAX_SURE_TOKENS = 1 << 20


def instance_handler(cancel: Callable[[str], None], stats: Callable[[], dict[str, Any]],
                     wake: Callable[[], None] = lambda: None,
                     expect: Callable[[str, int], None] | None = None
                     ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The standard op table of an engine instance; with `expect`, also
    `{"op": "expect", "req_id": ..., "sure_tokens": n}`: a request routed here is being
    prefilled elsewhere (backends.core.tpot_slack.Expected)."""
    def req_id_of(msg: dict[str, Any]) -> str:
        req_id = msg.get("req_id")
        if not isinstance(req_id, str) or not req_id:
            raise ValueError(f"{msg.get('op')} needs a req_id string")
        return req_id

    def handle(msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "cancel":
            cancel(req_id_of(msg))
            wake()
            return {"ok": True}
        if op == "expect" and expect is not None:
            req_id, sure = req_id_of(msg), msg.get("sure_tokens")
            if type(sure) is not int or not 0 <= sure <= MAX_SURE_TOKENS:
                raise ValueError(f"expect needs sure_tokens, an int in [0, {MAX_SURE_TOKENS}]")
            expect(req_id, sure)
            return {"ok": True}
        if op == "stats":
            return stats()
        ops = "cancel, expect, stats" if expect is not None else "cancel, stats"
        raise ValueError(f"unknown op {op!r} ({ops})")
    return handle
