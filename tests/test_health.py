"""The orchestrator's instance monitor, with a fake probe and reload (no server)."""
from __future__ import annotations

import asyncio

import pytest

from backends.orchestrator.health import DEAD, STUCK, InstanceMonitor, phase_of


class Fleet:
    """What each instance's probe does: answer, refuse (dead), or time out (stopped)."""

    def __init__(self, *ids: str) -> None:
        self.state = {i: "up" for i in ids}
        self.reloads: list[str] = []
        self.now = 0.0

    def probe(self, instance: str) -> None:
        if self.state[instance] == "dead":
            raise ConnectionRefusedError(instance)        # the socket file, no process
        if self.state[instance] == "absent":
            raise FileNotFoundError(instance)             # no socket (yet, or any more)
        if self.state[instance] == "stopped":
            raise TimeoutError("timed out")

    def reload(self, model: str) -> None:
        self.reloads.append(model)


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
        on_decode, on_prefill = monitor.watch("decode"), monitor.watch("prefill")
        on_decode.narrow("decode-0")
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
        assert fleet.reloads == ["decode"]
        assert monitor.status() == {"prefill-0": "up", "decode-0": DEAD} and not monitor.ready()
        new = monitor.watch("decode")                   # no new request waits behind it
        await settle()
        assert new.failed.done() and "no decode instance can serve" in new.failed.result()
        fleet.state["decode-0"] = "up"                  # back after the reload
        sweep(fleet, monitor)
        assert monitor.ready() and not monitor.watch("decode").failed.done()
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
        assert fleet.reloads == ["decode"]
        sweep(fleet, monitor, 30.0)
        await asyncio.sleep(0.05)
        assert fleet.reloads == ["decode", "decode"]
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
        monitor.probe = lambda i: {"pid": os.getpid()}  # a process that surely exists
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


def test_process_alive():
    import os
    from backends.orchestrator.health import process_alive
    assert process_alive(os.getpid()) and not process_alive(None) and not process_alive(2 ** 22 + 17)


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
