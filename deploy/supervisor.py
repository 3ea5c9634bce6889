"""Supervision of the front-end models' stubs from the launcher (deploy/server.py).

The engine instances are watched by the orchestrator (backends/orchestrator/health.py); nothing
inside the server watches the orchestrator itself. Its python-backend stub can die (a crash in
the stub's BLS machinery was seen once in a soak: SIGSEGV in the stub's allocator), and Triton
then answers every request to it with "Stub process ... is not healthy" until it gives up
answering at all. The launcher therefore polls the stubs of the models it supervises (children
of tritonserver whose command line runs `<model>/1/model.py`) every `interval_s`; when one that
was there is gone (or a zombie), it calls `recover(model)`: the launcher reloads that model
(unload + load) or, when the dead stub had requests in flight, restarts the whole server
(TritonServer.recover_front_end says why). A recovery that restarts the server gives the
supervisor the new server's pid through `rebase()`.

    sup = Supervisor(tritonserver_pid, ("distserve",), recover=lambda m: ...)
    sup.start(); ...; sup.stop()
"""
from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

from backends.serving.metrics import IN_FLIGHT_METRIC

log = logging.getLogger(__name__)


def reload_model(http_url: str, model: str, timeout_s: float = 600.0) -> None:
    """Ask the tritonserver at `http_url` ("host:port") to unload `model` and load it again
    (explicit model control), which restarts its stubs. Unload first: a `load` of a model
    Triton holds as loaded is a no-op after the first reload, and a dead stub stays dead.
    RuntimeError if Triton refuses."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: no proxy
    for op in ("unload", "load"):
        request = urllib.request.Request(f"http://{http_url}/v2/repository/models/{model}/{op}",
                                         data=b"{}", method="POST")
        try:
            with opener.open(request, timeout=timeout_s) as response:
                log.warning("%s %s: HTTP %d", op, model, response.status)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"Triton refused to {op} {model}: {e.read().decode()[:300]} "
                               "(it needs --model-control-mode=explicit)") from None


def requests_in_flight(metrics_url: str, model: str, timeout_s: float = 5.0) -> int | None:
    """The orchestrator's `distserve_requests_in_flight` gauge for `model` (Triton keeps a
    gauge's last value after the stub that set it dies); None if it cannot be read."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    prefix = f'{IN_FLIGHT_METRIC}{{model="{model}"}} '
    values = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
    try:
        return round(float(values[0])) if values else None
    except ValueError:
        return None


def stub_pids(parent_pid: int, model: str) -> set[int]:
    """Live (not zombie) python-backend stubs of `model` among `parent_pid`'s children."""
    suffix = f"/{model}/1/model.py".encode()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent_pid or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if any(arg.endswith(suffix) for arg in f.read().split(b"\0")):
                    out.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue                        # gone meanwhile
    return out


class Supervisor:
    def __init__(self, parent_pid: int, models: Iterable[str], recover: Callable[[str], None],
                 interval_s: float = 1.0,
                 list_stubs: Callable[[int, str], set[int]] = stub_pids) -> None:
        self.parent_pid = parent_pid
        self.models = tuple(models)
        self.recover = recover
        self.interval_s = interval_s
        self.list_stubs = list_stubs
        self.known: dict[str, set[int]] = {}
        self.reloads: list[str] = []                  # models recovered, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def rebase(self, parent_pid: int) -> None:
        """The server was restarted: watch the new one's stubs from now on."""
        self.parent_pid = parent_pid
        self.known = {m: self.list_stubs(parent_pid, m) for m in self.models}

    def check(self) -> list[str]:
        """One poll: the models whose stub died since the last poll, recovered."""
        died = []
        for model in self.models:
            parent = self.parent_pid
            now = self.list_stubs(parent, model)
            before = self.known.get(model, set())
            if before - now and not self._stop.is_set():
                log.error("the stub of %s (pid %s) is gone: recovering", model, sorted(before - now))
                died.append(model)
                try:
                    self.recover(model)
                    self.reloads.append(model)
                except Exception:               # noqa: BLE001 - try again at the next death
                    log.exception("recovering %s failed", model)
                if self.parent_pid != parent:   # restarted: rebase() took the new stubs
                    return died
                now = self.list_stubs(parent, model)
            self.known[model] = now
        return died

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
