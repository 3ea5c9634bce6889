"""Instance health for the orchestrator: notice a dead or stuck instance within seconds, fail the
requests waiting on it, bring a dead one back, and place each request on a live instance.

    monitor = InstanceMonitor(["prefill-0", "decode-0", "decode-1"], probe, reload)
    monitor.start()
    watch = monitor.place("decode")         # the least loaded live decode instance: watch.instance
    await watch.failed                      # resolves with an error message if it goes down
    watch.close(); monitor.stop()
    monitor.watch_instance("prefill-0")     # a wait on a given instance
    monitor.watch("colocated")              # a wait on some instance of a phase (Triton picks) ...
    watch.narrow("colocated-1")             # ... on this one, once it said so (Accepted)

Every `interval_s` the monitor probes each instance (`probe(instance_id)`: its control socket's
stats, a short timeout):
- refused, and the process that answered last is gone (or was never known): DOWN at once, and
  every request watching it fails. (A stopped process refuses too, once its listen queue is
  full: while it exists it counts as silent, below.) Its socket gone after it was up: it was
  unloaded in order (server stopping): DOWN, requests fail, never reloaded;
  If it is still gone `reload_after_s` later (Triton did not restart the stub itself),
  `reload(model)` is asked to bring it back (Triton's model-control API), on a thread of its
  own, again every `retry_reload_s` while it stays gone;
- no answer for `stuck_after_s`, and its process is stopped (SIGSTOP), gone from view, or has
  used no CPU time since the silence began (wedged): DOWN; its requests fail; no reload (a
  stopped process may resume: SIGCONT). A silent process that keeps using CPU is busy, not
  stuck (a long step on a shared, overloaded core can delay its answer by seconds): it is
  given `busy_after_s` before the same verdict;
- an answer saying it has held work without progress for `stall_after_s` (its `stalled_s`: no
  batch run and no output, or a response stuck in its sender; backends/serving/host.py): STUCK,
  its requests fail, and it stays down while the stall lasts (it has logged its threads'
  stacks). The default is past the KV lease timeout (kvtransfer.lease: 60 s), the longest a
  healthy instance waits with work (a prefill instance whose KV is all lent out);
- an answer from another process than before (Triton restarted the stub on its own): the
  requests of the old process fail (theirs died with it), and the instance is UP;
- an answer: UP (again); while its model is being reloaded, UP only once the reload returned
  (Triton serves the model from then on).
A watch made while its instance (or every instance of its phase) is down fails at once, so no
new request waits behind a dead instance.

Placement (`place`): until the SLO router is wired in, each request goes to the least loaded
(backends/core/routing.least_loaded; ties to the first) live instance of its phase, by the
instance's stats in the latest probe's answer (`instance_load`) plus what this monitor placed
there since that probe began, so a burst spreads instead of piling onto the instance that
looked idle a second ago. A reload is per model (`model_of`: one instance's, for prefill and
decode), so the other instances keep serving. Pure policy and threads: no Triton here; the
Triton glue (orchestrator_adapter) supplies `probe` and `reload`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from backends.core.routing import least_loaded
from deploy.contract import instance_model

log = logging.getLogger(__name__)

DEAD, STUCK = "dead", "stuck"
SLOW_PROBE_S = 0.5


def process_state(pid: Any) -> tuple[str, int] | None:
    """(state letter, CPU clock ticks used) of process `pid` from /proc, or None if it is
    unknown or gone. "T"/"t": stopped; "Z": a zombie."""
    if not isinstance(pid, int):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])      # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def phase_of(instance_id: str) -> str:
    """"decode-1" -> "decode": the phase of an instance id (deploy.contract.instance_model
    gives its Triton model)."""
    return instance_id.rsplit("-", 1)[0]


def instance_load(phase: str, stats: dict[str, Any], sent_requests: int = 0,
                  sent_tokens: int = 0) -> tuple[int, int]:
    """How loaded an instance is, for least-loaded placement (compared as a tuple), from its
    probed `stats` and the requests (and their prompt tokens) sent to it since: prefill, the
    prompt tokens queued for it, then the requests; decode (or colocated), the sequences
    running or waiting for their KV."""
    if phase == "prefill":
        return (stats.get("backlog_tokens", 0) + sent_tokens, stats.get("queue_depth", 0) + sent_requests)
    return (stats.get("running", 0) + stats.get("pending", stats.get("queue_depth", 0)) + sent_requests, 0)


class Watch:
    """One request's wait on a phase's instances (or, once narrowed, on one of them)."""

    def __init__(self, monitor: InstanceMonitor, phase: str, loop: asyncio.AbstractEventLoop) -> None:
        self.monitor, self.phase, self.loop = monitor, phase, loop
        self.instance: str | None = None
        self.failed: asyncio.Future = loop.create_future()

    def narrow(self, instance_id: str) -> None:
        with self.monitor._lock:
            self.instance = instance_id
            reason = self.monitor._down.get(instance_id)
        if reason:
            self.fail(f"{instance_id} is {reason}")

    def fail(self, error: str) -> None:
        """Thread-safe: resolve `failed` with `error` (first call wins)."""
        def set_it() -> None:
            if not self.failed.done():
                self.failed.set_result(error)
        self.loop.call_soon_threadsafe(set_it)

    def close(self) -> None:
        with self.monitor._lock:
            self.monitor._watches.discard(self)
        if not self.failed.done():
            self.failed.cancel()


class InstanceMonitor:
    def __init__(self, instance_ids: list[str], probe: Callable[[str], Any],
                 reload: Callable[[str], None], interval_s: float = 1.0, stuck_after_s: float = 4.0,
                 stall_after_s: float = 90.0, reload_after_s: float = 3.0, retry_reload_s: float = 30.0,
                 busy_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 model_of: Callable[[str], str] = instance_model,
                 on_round: Callable[[dict[str, str]], None] | None = None,
                 proc: Callable[[Any], tuple[str, int] | None] = process_state) -> None:
        """`on_round(status())` runs after each round of probes (e.g. health gauges); `proc(pid)`
        reads a process's state and CPU time (`process_state`)."""
        self.instance_ids = list(instance_ids)
        self.on_round = on_round
        self.probe, self.reload, self.model_of = probe, reload, model_of
        self.interval_s, self.stuck_after_s, self.clock = interval_s, stuck_after_s, clock
        self.stall_after_s, self.busy_after_s, self.proc = stall_after_s, busy_after_s, proc
        self._cpu_at_silence: dict[str, int] = {}      # CPU ticks when its silence began
        self._busy_noted: set[str] = set()              # silent but busy: logged once
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._down: dict[str, str] = {}               # instance -> DEAD / STUCK
        self._seen_up: set[str] = set()
        self._last_answer: dict[str, float] = {}
        self._pid: dict[str, Any] = {}                 # the process that answered last
        self._reloading: set[str] = set()              # models being reloaded
        self._reloaded_at: dict[str, float] = {}
        self._down_since: dict[str, float] = {}
        self._stats: dict[str, dict] = {}              # the latest probe's answer
        self._sent: dict[str, list[int]] = {}         # [requests, prompt tokens] placed, ever
        self._sent_at_probe: dict[str, tuple[int, int]] = {}   # ... when that probe began
        self.reload_after_s, self.retry_reload_s = reload_after_s, retry_reload_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instance-monitor", daemon=True)
        self.events: list[tuple[float, str, str]] = []     # (time, instance, "dead"/"stuck"/"up")

    # -- requests -----------------------------------------------------------------------------
    def watch(self, phase: str, loop: asyncio.AbstractEventLoop | None = None) -> Watch:
        w = Watch(self, phase, loop or asyncio.get_running_loop())
        with self._lock:
            self._watches.add(w)
            of_phase = [i for i in self.instance_ids if phase_of(i) == phase]
            all_down = bool(of_phase) and all(i in self._down for i in of_phase)
        if all_down:
            w.fail(f"no {phase} instance can serve: " +
                   ", ".join(f"{i} is {self._down[i]}" for i in of_phase))
        return w

    def watch_instance(self, instance: str, loop: asyncio.AbstractEventLoop | None = None) -> Watch:
        """A wait on `instance`; failed at once if it is down."""
        w = Watch(self, phase_of(instance), loop or asyncio.get_running_loop())
        w.instance = instance
        with self._lock:
            self._watches.add(w)
            reason = self._down.get(instance)
        if reason:
            w.fail(f"{instance} is {reason}")
        return w

    def place(self, phase: str, tokens: int = 0, loop: asyncio.AbstractEventLoop | None = None) -> Watch:
        """A wait on the least loaded live instance of `phase` (`watch.instance`), counted there
        with its `tokens` prompt tokens; failed at once (`instance` None) if none is live."""
        w = Watch(self, phase, loop or asyncio.get_running_loop())
        with self._lock:
            of_phase = [i for i in self.instance_ids if phase_of(i) == phase]
            live = [i for i in of_phase if i not in self._down]
            if live:
                w.instance = least_loaded(live, self._load)
                sent = self._sent.setdefault(w.instance, [0, 0])
                sent[0] += 1
                sent[1] += tokens
                self._watches.add(w)
        if not live:
            w.fail(f"no {phase} instance can serve: " +
                   (", ".join(f"{i} is {self._down[i]}" for i in of_phase) or "the deployment has none"))
        return w

    def load(self, instance: str) -> tuple[int, int]:
        """`instance_load` of `instance`: its latest probed stats and what was placed since."""
        with self._lock:
            return self._load(instance)

    def _load(self, instance: str) -> tuple[int, int]:
        requests, tokens = self._sent.get(instance, (0, 0))
        then = self._sent_at_probe.get(instance, (0, 0))
        return instance_load(phase_of(instance), self._stats.get(instance, {}),
                             requests - then[0], tokens - then[1])

    def status(self) -> dict[str, str]:
        with self._lock:
            return {i: self._down.get(i, "up" if i in self._seen_up else "starting")
                    for i in self.instance_ids}

    def ready(self) -> bool:
        """Every phase has an instance that answers."""
        st = self.status()
        phases = {phase_of(i) for i in st}
        return all(any(s == "up" for i, s in st.items() if phase_of(i) == p) for p in phases)

    # -- the probe loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for instance in self.instance_ids:
                try:
                    self.check(instance)
                except Exception:                      # noqa: BLE001 - keep watching the others
                    log.exception("checking %s failed", instance)
            if self.on_round is not None:
                try:
                    self.on_round(self.status())
                except Exception:                      # noqa: BLE001 - a gauge must not stop the probes
                    log.exception("on_round failed")

    def check(self, instance: str) -> None:
        """Probe one instance and act on the answer (the loop's body; tests call it directly)."""
        now = self.clock()
        with self._lock:
            placed = tuple(self._sent.get(instance, (0, 0)))
        started = time.monotonic()
        try:
            reply = self.probe(instance)
            took = time.monotonic() - started
            if took >= SLOW_PROBE_S:            # a clue for a later false STUCK: who was slow
                log.warning("%s took %.2f s to answer its probe", instance, took)
            if isinstance(reply, dict) and reply.get("error"):
                raise RuntimeError(reply["error"])
        except (ConnectionRefusedError, FileNotFoundError) as e:
            state = self.proc(self._pid.get(instance))
            if state is not None and state[0] not in "ZX":
                e = TimeoutError("its process lives but does not accept (stopped?)")
                self._silent(instance, now, e)
                return
            # refused: the socket is there, its process is not (it crashed); absent: not up
            # yet, or unloaded in order (an instance removes its socket when it finalizes:
            # the server is stopping or unloading it, so it is not brought back)
            if isinstance(e, ConnectionRefusedError):
                self._went_down(instance, DEAD, "its process is gone")
                model = self.model_of(instance)
                gone_for = now - self._down_since.get(instance, now)
                since_reload = now - self._reloaded_at.get(model, float("-inf"))
                if gone_for >= self.reload_after_s and since_reload >= self.retry_reload_s:
                    self._reload(model)
            elif instance in self._seen_up:
                self._went_down(instance, DEAD, "unloaded")
            return
        except Exception as e:                         # noqa: BLE001 - connected, no (good) answer
            self._silent(instance, now, e)
            return
        self._last_answer[instance] = now
        self._cpu_at_silence.pop(instance, None)
        self._busy_noted.discard(instance)
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if self._pid.get(instance, pid) != pid:
            self._went_down(instance, DEAD, f"restarted: process {self._pid[instance]} -> {pid}",
                            whole_phase=True)
        self._pid[instance] = pid
        model = self.model_of(instance)
        stalled = reply.get("stalled_s", 0) if isinstance(reply, dict) else 0
        with self._lock:
            if isinstance(reply, dict):
                self._stats[instance], self._sent_at_probe[instance] = reply, placed
        if isinstance(stalled, (int, float)) and stalled >= self.stall_after_s:
            where = reply.get("stalled_in") or "step loop"
            self._went_down(instance, STUCK, f"its {where} has made no progress for {stalled:.0f} s")
            return
        with self._lock:
            if instance in self._down and model in self._reloading:
                return                  # Triton serves it once the load returned: next probe
            was = self._down.pop(instance, None)
            self._seen_up.add(instance)
        if was:
            self._reloaded_at.pop(model, None)          # a next death reloads at once
            log.warning("%s answers again", instance)
            self.events.append((now, instance, "up"))

    def _silent(self, instance: str, now: float, e: BaseException) -> None:
        """No answer: STUCK once silent for `stuck_after_s` since its last answer (or since the
        first silence, if it never answered: its socket exists, so it bound it, then stopped),
        unless its process is busy (running and using CPU since the silence began): then once
        silent for `busy_after_s`."""
        since = self._last_answer.setdefault(instance, now)
        silent_for = now - since
        proc = self.proc(self._pid.get(instance))
        if proc is not None:
            self._cpu_at_silence.setdefault(instance, proc[1])
        if silent_for < self.stuck_after_s:
            return
        busy = (proc is not None and proc[0] not in "TtZX"
                and proc[1] > self._cpu_at_silence.get(instance, proc[1]))
        if busy and silent_for < self.busy_after_s:
            if instance not in self._busy_noted:
                self._busy_noted.add(instance)
                log.warning("%s has not answered for %.1f s, but its process is running: busy, "
                            "not stuck (stuck after %.0f s)", instance, silent_for, self.busy_after_s)
            return
        why = f"no answer for {silent_for:.1f} s"
        if proc is not None:
            why += ", its process stopped" if proc[0] in "Tt" else (
                ", its process using CPU" if busy else ", its process using no CPU")
        self._went_down(instance, STUCK, f"{why} ({e})")

    def _went_down(self, instance: str, state: str, why: str, whole_phase: bool = False) -> None:
        """Fail the requests on `instance` (and those not yet placed, when no instance of its
        phase is left or `whole_phase`: they may have gone to it)."""
        with self._lock:
            if instance in self._down:
                return
            self._down[instance] = state
            self._down_since[instance] = self.clock()
            phase = phase_of(instance)
            of_phase = [i for i in self.instance_ids if phase_of(i) == phase]
            whole_phase = whole_phase or all(i in self._down for i in of_phase)
            victims = [w for w in self._watches if w.instance == instance
                       or (w.instance is None and w.phase == phase and whole_phase)]
        log.error("%s is %s (%s): failing %d request(s)", instance, state, why, len(victims))
        self.events.append((self.clock(), instance, state))
        for w in victims:
            w.fail(f"{instance} is {state} ({why})")

    def _reload(self, model: str) -> None:
        with self._lock:
            if model in self._reloading:
                return
            self._reloading.add(model)
            self._reloaded_at[model] = self.clock()

        def run() -> None:
            try:
                log.warning("reloading model %s", model)
                self.reload(model)
            except Exception:                          # noqa: BLE001 - logged; the probe retries
                log.exception("reloading %s failed", model)
            finally:
                with self._lock:
                    self._reloading.discard(model)
        threading.Thread(target=run, name=f"reload-{model}", daemon=True).start()
