"""The orchestrator's instance monitor, with a fake probe and reload (no server): detection,
reloads, and the placement of requests on live instances."""
from __future__ import annotations

import asyncio
import threading

import pytest

from backends.orchestrator.health import DEAD, STUCK, InstanceMonitor, instance_load, phase_of


class Fleet:
    """What each instance's probe does: answer (its `stats`), refuse (dead), or time out
    (stopped). A reload is recorded; with `hold_reloads` set it returns once released."""

    def __init__(self, *ids: str) -> None:
        self.state = {i: "up" for i in ids}
        self.stats: dict[str, dict] = {i: {} for i in ids}
        self.reloads: list[str] = []
        self.now = 0.0
        self.hold_reloads: threading.Event | None = None
        self.during_probe = lambda instance: None

    def probe(self, instance: str) -> dict:
        if self.state[instance] == "dead":
            raise ConnectionRefusedError(instance)        # the socket file, no process
        if self.state[instance] == "absent":
            raise FileNotFoundError(instance)             # no socket (yet, or any more)
        if self.state[instance] == "stopped":
            raise TimeoutError("timed out")
        self.during_probe(instance)
        return dict(self.stats[instance])

    def reload(self, model: str) -> None:
        self.reloads.append(model)
        if self.hold_reloads is not None:
            self.hold_reloads.wait(10)


def make(*ids: str) -> tuple[Fleet, InstanceMonitor]:
    fleet = Fleet(*ids)
    monitor = InstanceMonitor(list(ids), fleet.probe, fleet.reload, stuck_after_s=4.0,
                              retry_reload_s=30.0, clock=lambda: fleet.now)
    return fleet, monitor


def sweep(fleet: Fleet, monitor: InstanceMonitor, seconds: float = 1.0) -> None:
    fleet.now += seconds
    for i in monitor.instance_ids:
        monitor.check(i)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_phase_of():
    assert phase_of("decode-12") == "decode" and phase_of("prefill-0") == "prefill"


def test_a_dead_instance_fails_its_requests_and_is_reloaded_once():
    async def go():
        fleet, monitor = make("prefill-0", "decode-0")
        sweep(fleet, monitor)
        on_decode, on_prefill = monitor.place("decode"), monitor.place("prefill")
        assert (on_decode.instance, on_prefill.instance) == ("decode-0", "prefill-0")
        fleet.state["decode-0"] = "dead"
        sweep(fleet, monitor)
        sweep(fleet, monitor)
        await settle()
        assert on_decode.failed.done() and "decode-0 is dead" in on_decode.failed.result()
        assert not on_prefill.failed.done()
        await asyncio.sleep(0.05)
        assert fleet.reloads == []                      # Triton may restart the stub itself
        sweep(fleet, monitor, 2.0)                      # 3 s gone: ask for a reload
        await asyncio.sleep(0.05)                       # (on its own thread)
        assert fleet.reloads == ["decode_0"]            # the instance's own model
        assert monitor.status() == {"prefill-0": "up", "decode-0": DEAD} and not monitor.ready()
        new = monitor.place("decode")                   # no new request waits behind it
        await settle()
        assert new.instance is None and "no decode instance can serve: decode-0 is dead" in new.failed.result()
        fleet.state["decode-0"] = "up"                  # back after the reload
        sweep(fleet, monitor)
        assert monitor.ready() and not monitor.place("decode").failed.done()
        for w in (on_decode, on_prefill, new):
            w.close()
    asyncio.run(go())


def test_a_stopped_instance_fails_after_the_stuck_time_and_comes_back_without_reload():
    async def go():
        fleet, monitor = make("decode-0", "decode-1")
        sweep(fleet, monitor)
        w0, w1, unnarrowed = monitor.watch("decode"), monitor.watch("decode"), monitor.watch("decode")
        w0.narrow("decode-0")
        w1.narrow("decode-1")
        fleet.state["decode-0"] = "stopped"
        sweep(fleet, monitor, 3.0)
        await settle()
        assert not w0.failed.done()                     # 3 s without an answer: not yet
        sweep(fleet, monitor, 1.5)
        await settle()
        assert w0.failed.done() and STUCK in w0.failed.result()
        assert not w1.failed.done() and not unnarrowed.failed.done()   # decode-1 still serves
        assert monitor.ready() and fleet.reloads == []
        fleet.state["decode-0"] = "up"
        sweep(fleet, monitor)
        assert monitor.status()["decode-0"] == "up"
        assert [e[1:] for e in monitor.events] == [("decode-0", STUCK), ("decode-0", "up")]
        for w in (w0, w1, unnarrowed):
            w.close()
    asyncio.run(go())


def test_an_instance_that_answers_but_makes_no_progress_is_stuck_while_the_stall_lasts():
    """Its probe answers (the control thread lives) but says its step loop has held work
    without progress for stall_after_s (90 s by default): STUCK, its requests fail with where
    it stalled, no reload; UP again once it makes progress."""
    async def go():
        fleet, monitor = make("prefill-0", "decode-0")
        assert monitor.stall_after_s == 90.0
        sweep(fleet, monitor)
        on_decode = monitor.place("decode")
        fleet.stats["decode-0"] = {"stalled_s": 89.0, "stalled_in": "step loop"}
        sweep(fleet, monitor)
        await settle()
        assert not on_decode.failed.done() and monitor.status()["decode-0"] == "up"
        fleet.stats["decode-0"] = {"stalled_s": 95.0, "stalled_in": "response sender"}
        sweep(fleet, monitor)
        await settle()
        assert "decode-0 is stuck (its response sender has made no progress for 95 s)" in on_decode.failed.result()
        sweep(fleet, monitor)                           # still stalled: stays down
        new = monitor.place("decode")
        await settle()
        assert new.instance is None and new.failed.done()
        fleet.stats["decode-0"] = {"stalled_s": 0.0}
        sweep(fleet, monitor)
        assert monitor.status()["decode-0"] == "up" and fleet.reloads == []
        assert [e[1:] for e in monitor.events] == [("decode-0", STUCK), ("decode-0", "up")]
        for w in (on_decode, new):
            w.close()
    asyncio.run(go())


def test_not_yet_started_instances_are_not_dead_and_reloads_are_retried():
    async def go():
        fleet, monitor = make("decode-0")
        fleet.state["decode-0"] = "absent"              # still loading: no socket yet
        sweep(fleet, monitor)
        assert monitor.status() == {"decode-0": "starting"} and fleet.reloads == []
        fleet.state["decode-0"] = "up"
        sweep(fleet, monitor)
        fleet.state["decode-0"] = "dead"
        sweep(fleet, monitor)
        sweep(fleet, monitor, 3.0)
        await asyncio.sleep(0.05)
        sweep(fleet, monitor, 10.0)                     # still dead, reload too recent
        await asyncio.sleep(0.05)
        assert fleet.reloads == ["decode_0"]
        sweep(fleet, monitor, 30.0)
        await asyncio.sleep(0.05)
        assert fleet.reloads == ["decode_0", "decode_0"]
    asyncio.run(go())


@pytest.mark.parametrize("closed_first", [True, False])
def test_closed_watches_are_forgotten(closed_first):
    async def go():
        fleet, monitor = make("decode-0")
        sweep(fleet, monitor)
        w = monitor.watch("decode")
        if closed_first:
            w.close()
        fleet.state["decode-0"] = "dead"
        sweep(fleet, monitor)
        await settle()
        assert w.failed.done()
        assert w.failed.cancelled() == closed_first
        w.close()
        assert not monitor._watches
    asyncio.run(go())


def test_a_restarted_process_fails_the_requests_of_the_old_one():
    """Triton may restart a dead stub by itself: the instance answers again at once, from
    another process; requests that were on the old process must not wait forever."""
    async def go():
        fleet, monitor = make("decode-0")
        pid = [100]
        monitor.probe = lambda i: {"pid": pid[0]}
        sweep(fleet, monitor)
        on_old, unplaced = monitor.watch("decode"), monitor.watch("decode")
        on_old.narrow("decode-0")
        pid[0] = 101
        sweep(fleet, monitor)
        await settle()
        assert "restarted" in on_old.failed.result() and unplaced.failed.done()
        assert monitor.status() == {"decode-0": "up"} and fleet.reloads == []
        fresh = monitor.watch("decode")
        fresh.narrow("decode-0")
        sweep(fleet, monitor)
        await settle()
        assert not fresh.failed.done()
        for w in (on_old, unplaced, fresh):
            w.close()
    asyncio.run(go())


def test_an_instance_stopped_before_its_first_answer_is_still_found_stuck():
    async def go():
        fleet, monitor = make("decode-0")
        w = monitor.watch("decode")
        fleet.state["decode-0"] = "stopped"             # its socket exists; it never answered
        sweep(fleet, monitor)
        sweep(fleet, monitor, 4.0)
        await settle()
        assert STUCK in w.failed.result()
        w.close()
    asyncio.run(go())


def test_a_refusing_instance_whose_process_lives_is_stuck_not_dead():
    """A stopped process refuses connections once its listen queue is full: while the process
    exists that is silence (stuck, no reload), not death."""
    async def go():
        import os
        fleet, monitor = make("decode-0")
        monitor.probe = lambda i: {"pid": os.getpid()}  # a process that surely exists ...
        monitor.proc = lambda pid: ("T", 100)           # ... seen stopped
        sweep(fleet, monitor)
        monitor.probe = fleet.probe
        fleet.state["decode-0"] = "dead"                # refused
        w = monitor.watch("decode")
        for _ in range(6):
            sweep(fleet, monitor)
        await asyncio.sleep(0.05)
        assert STUCK in w.failed.result() and fleet.reloads == []
        w.close()
    asyncio.run(go())


def test_a_silent_instance_that_uses_cpu_is_busy_until_busy_after_s_and_a_wedged_one_is_stuck():
    """Silence alone is not a verdict: a process running and using CPU (a long step on an
    overloaded core) gets busy_after_s; one stopped, or using no CPU (wedged), gets stuck_after_s."""
    async def go():
        fleet, monitor = make("prefill-0", "decode-0", "decode-1")
        monitor.busy_after_s = 12.0
        ticks = {"prefill-0": 0, "decode-0": 0, "decode-1": 0}
        state = {"prefill-0": "R", "decode-0": "S", "decode-1": "T"}
        pids = {"prefill-0": 11, "decode-0": 12, "decode-1": 13}
        fleet.stats = {i: {"pid": pids[i]} for i in pids}
        by_pid = {v: k for k, v in pids.items()}
        monitor.proc = lambda pid: (state[by_pid[pid]], ticks[by_pid[pid]])
        sweep(fleet, monitor)
        watches = {i: monitor.watch_instance(i) for i in pids}
        for i in pids:
            fleet.state[i] = "stopped"                  # every probe times out from now on
        for _ in range(11):                             # 11 s of silence
            ticks["prefill-0"] += 100                   # busy: it keeps computing
            sweep(fleet, monitor)
        await settle()
        assert not watches["prefill-0"].failed.done()
        assert "using no CPU" in watches["decode-0"].failed.result()
        assert "its process stopped" in watches["decode-1"].failed.result()
        ticks["prefill-0"] += 100
        sweep(fleet, monitor)                           # 12 s: busy or not, it is stuck now
        await settle()
        assert "using CPU" in watches["prefill-0"].failed.result()
        fleet.state["prefill-0"] = "up"                 # it answers: up, and a new silence ...
        sweep(fleet, monitor)
        fleet.state["prefill-0"] = "stopped"
        for _ in range(5):                              # ... that uses no CPU is stuck in 4 s
            sweep(fleet, monitor)
        await settle()
        assert [e[1:] for e in monitor.events if e[1] == "prefill-0"] == [
            ("prefill-0", STUCK), ("prefill-0", "up"), ("prefill-0", STUCK)]
        for w in watches.values():
            w.close()
    asyncio.run(go())


def test_process_state_of_a_real_busy_and_a_stopped_process():
    import os
    import signal
    import subprocess
    import sys
    import time
    from backends.orchestrator.health import process_state
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        first = process_state(busy.pid)
        time.sleep(0.5)
        second = process_state(busy.pid)
        assert first[0] == "R" and second[1] > first[1]
        os.kill(busy.pid, signal.SIGSTOP)
        for _ in range(100):
            if process_state(busy.pid)[0] == "T":
                break
            time.sleep(0.01)
        stopped = process_state(busy.pid)
        assert stopped[0] == "T"
        time.sleep(0.3)
        assert process_state(busy.pid)[1] == stopped[1]           # no CPU while stopped
    finally:
        busy.kill()
        busy.wait()
    assert process_state(busy.pid) is None and process_state(None) is None
    assert process_state(os.getpid())[0] == "R" and process_state(2 ** 22 + 17) is None


def test_an_instance_unloaded_in_order_fails_its_requests_but_is_not_reloaded():
    """Its socket is removed when it finalizes (the server stops or unloads it): reloading it
    then would start a stub that outlives the server."""
    async def go():
        fleet, monitor = make("decode-0")
        sweep(fleet, monitor)
        w = monitor.watch("decode")
        w.narrow("decode-0")
        fleet.state["decode-0"] = "absent"
        for _ in range(40):
            sweep(fleet, monitor)
        await asyncio.sleep(0.05)
        assert "unloaded" in w.failed.result() and fleet.reloads == []
        w.close()
    asyncio.run(go())


# ---- placement ----------------------------------------------------------------------------

def test_instance_load():
    assert instance_load("prefill", {"backlog_tokens": 300, "queue_depth": 2}, 1, 50) == (350, 3)
    assert instance_load("decode", {"running": 3, "pending": 2, "queue_depth": 9}, 1) == (6, 0)
    assert instance_load("decode", {}) == instance_load("prefill", {}) == (0, 0)   # never probed


def placed(monitor: InstanceMonitor, phase: str, n: int, tokens: int = 0) -> list[str | None]:
    watches = [monitor.place(phase, tokens) for _ in range(n)]
    for w in watches:
        w.close()
    return [w.instance for w in watches]


def test_place_goes_to_the_least_loaded_live_instance_and_a_burst_spreads():
    async def go():
        fleet, monitor = make("decode-0", "decode-1", "decode-2", "decode-3")
        fleet.stats["decode-0"] = {"running": 3, "pending": 0}
        fleet.stats["decode-1"] = {"running": 1, "pending": 1}
        fleet.stats["decode-2"] = {"running": 0, "pending": 0}
        fleet.stats["decode-3"] = {"running": 2, "pending": 0}
        sweep(fleet, monitor)
        fleet.state["decode-2"] = "dead"                # the idlest, but dead
        sweep(fleet, monitor)
        # loads 3, 2, -, 2: decode-1 (ties go to the first), then decode-3, then the
        # requests just sent count: 3, 3, -, 3 -> decode-0, decode-1, decode-3, ...
        assert placed(monitor, "decode", 5) == ["decode-1", "decode-3", "decode-0", "decode-1", "decode-3"]
        assert monitor.load("decode-1") == (4, 0) and monitor.load("decode-0") == (4, 0)
        fleet.stats["decode-1"] = {"running": 0, "pending": 0}   # its requests finished
        sweep(fleet, monitor)                           # a probe: what was sent is in its stats
        assert monitor.load("decode-1") == (0, 0) and monitor.load("decode-0") == (3, 0)
        assert placed(monitor, "decode", 1) == ["decode-1"]
    asyncio.run(go())


def test_place_prefill_by_queued_prompt_tokens_then_requests():
    async def go():
        fleet, monitor = make("prefill-0", "prefill-1", "decode-0")
        fleet.stats["prefill-0"] = {"backlog_tokens": 1000, "queue_depth": 1}
        fleet.stats["prefill-1"] = {"backlog_tokens": 200, "queue_depth": 4}
        sweep(fleet, monitor)
        assert placed(monitor, "prefill", 1, tokens=700) == ["prefill-1"]    # 200 < 1000 tokens
        assert placed(monitor, "prefill", 1, tokens=100) == ["prefill-1"]    # 900 < 1000
        assert monitor.load("prefill-1") == (1000, 6)
        assert placed(monitor, "prefill", 1, tokens=5) == ["prefill-0"]      # 1000 each: 1 < 6 requests
    asyncio.run(go())


def test_requests_placed_while_a_probe_runs_still_count():
    """The probe's answer may predate a request placed while it was on its way: only what was
    placed before the probe began is taken as included in its stats."""
    async def go():
        loop = asyncio.get_running_loop()
        fleet, monitor = make("decode-0", "decode-1")
        sweep(fleet, monitor)
        fleet.during_probe = lambda i: i == "decode-0" and monitor.place("decode", loop=loop).close()
        sweep(fleet, monitor)                           # one request placed on decode-0 meanwhile
        fleet.during_probe = lambda i: None
        assert monitor.load("decode-0") == (1, 0) and placed(monitor, "decode", 1) == ["decode-1"]
    asyncio.run(go())


def test_no_live_instance_refuses_at_once_and_instances_not_yet_probed_take_requests():
    async def go():
        fleet, monitor = make("prefill-0", "decode-0", "decode-1")
        assert placed(monitor, "decode", 3) == ["decode-0", "decode-1", "decode-0"]   # starting
        for i in ("decode-0", "decode-1"):
            fleet.state[i] = "dead"
        sweep(fleet, monitor)
        w = monitor.place("decode")
        await settle()
        assert w.instance is None
        assert w.failed.result() == "no decode instance can serve: decode-0 is dead, decode-1 is dead"
        nothing = monitor.place("colocated")
        await settle()
        assert "the deployment has none" in nothing.failed.result()
        assert not monitor._watches
    asyncio.run(go())


def test_a_dead_instance_alone_is_reloaded_while_the_others_serve():
    async def go():
        fleet, monitor = make("prefill-0", "decode-0", "decode-1")
        fleet.hold_reloads = threading.Event()
        sweep(fleet, monitor)
        on_0, on_1 = monitor.place("decode"), monitor.place("decode")
        assert (on_0.instance, on_1.instance) == ("decode-0", "decode-1")
        fleet.state["decode-1"] = "dead"
        sweep(fleet, monitor)
        await settle()
        assert "decode-1 is dead" in on_1.failed.result() and not on_0.failed.done()
        assert monitor.ready()                          # decode-0 serves the phase
        sweep(fleet, monitor, 3.0)
        await asyncio.sleep(0.05)
        assert fleet.reloads == ["decode_1"]            # its model only
        assert placed(monitor, "decode", 3) == ["decode-0"] * 3
        fleet.state["decode-1"] = "up"                  # its new stub answers, the load has not returned
        sweep(fleet, monitor)
        assert monitor.status()["decode-1"] == DEAD and placed(monitor, "decode", 1) == ["decode-0"]
        fleet.hold_reloads.set()
        await asyncio.sleep(0.05)
        fleet.stats["decode-0"] = {"running": 5}        # it took everything meanwhile
        sweep(fleet, monitor)
        assert monitor.status()["decode-1"] == "up" and placed(monitor, "decode", 1) == ["decode-1"]
        assert fleet.reloads == ["decode_1"]
        for w in (on_0, on_1):
            w.close()
    asyncio.run(go())


def test_watch_instance_fails_at_once_if_that_instance_is_down():
    async def go():
        fleet, monitor = make("prefill-0", "prefill-1")
        sweep(fleet, monitor)
        fleet.state["prefill-1"] = "dead"
        sweep(fleet, monitor)
        up, down = monitor.watch_instance("prefill-0"), monitor.watch_instance("prefill-1")
        await settle()
        assert not up.failed.done() and down.failed.result() == "prefill-1 is dead"
        up.close()
        down.close()
    asyncio.run(go())

