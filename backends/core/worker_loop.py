"""The background step loop that drives one worker inside a server process, and the inbox
through which other threads hand a worker requests and cancellations.

    loop = WorkerLoop(worker, emit=on_output, poll_cancelled=lambda: [...])
    loop.start(); ...; loop.wake() after submit(); ...; loop.stop()

Each turn: cancel what the host reports cancelled, then `worker.step()`, then `emit` each output,
then `after_step()` (metrics).
With nothing to do, or nothing that can run now (the worker's `progressed` is False), it sleeps
until woken (or `idle_s`, so lease expiry still runs). `stalled_s()` says how long the loop has
held work without progress (no output, no batch run: the worker's `ran_batch`, where it has
one), for a watchdog; 0 while it has nothing to do. If a step
raises, every request the host knows of is failed through `on_crash` and the loop goes on:
one bad batch must not take the server down.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Worker(Protocol):
    def has_work(self) -> bool: ...
    def step(self) -> list[Any]: ...
    def cancel(self, req_id: str) -> None: ...


class Inbox:
    """Submissions and cancellations from any thread, taken in order by the step thread (a
    cancel never overtakes the submit it follows). Submissions are stamped on `clock`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, req: Any) -> None:
        self._queue.put(("submit", req, self.clock()))

    def cancel(self, req_id: str) -> None:
        self._queue.put(("cancel", req_id, 0.0))

    def expect(self, req_id: str, sure: int) -> None:
        self._queue.put(("expect", (req_id, sure), 0.0))

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()

    def drain(self) -> Iterator[tuple[str, Any, float]]:
        """("submit", request, arrival time), ("cancel", req_id, 0.0) or ("expect", (req_id,
        sure tokens), 0.0), oldest first."""
        while not self._queue.empty():
            yield self._queue.get()


class WorkerLoop:
    def __init__(self, worker: Worker, emit: Callable[[Any], None],
                 poll_cancelled: Callable[[], list[str]] = lambda: [],
                 on_crash: Callable[[BaseException], None] = lambda e: None,
                 after_step: Callable[[], None] = lambda: None,
                 idle_s: float = 0.05, name: str = "worker-loop") -> None:
        self.worker = worker
        self.emit = emit
        self.poll_cancelled = poll_cancelled
        self.on_crash = on_crash
        self.after_step = after_step
        self.idle_s = idle_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._progress_at = time.monotonic()     # idle, an output or a batch run, last seen

    def stalled_s(self) -> float:
        """Seconds since the loop last made progress or had nothing to do (any thread)."""
        return max(0.0, time.monotonic() - self._progress_at)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            for req_id in self.poll_cancelled():
                self.worker.cancel(req_id)
            if not self.worker.has_work():
                self._progress_at = time.monotonic()
                self._wake.wait(self.idle_s)
                self._wake.clear()
            try:
                outputs = self.worker.step()
            except Exception as e:          # noqa: BLE001 - keep serving; report per request
                log.exception("worker step failed")
                self.on_crash(e)
                continue
            if outputs or getattr(self.worker, "ran_batch", False):
                self._progress_at = time.monotonic()
            for out in outputs:
                self.emit(out)
            self.after_step()
            if not outputs and not getattr(self.worker, "progressed", True):
                # work is queued but none could run (e.g. prefill's KV all lent to decode):
                # wait to be woken or a moment, rather than spin on a core
                self._wake.wait(self.idle_s)
                self._wake.clear()
