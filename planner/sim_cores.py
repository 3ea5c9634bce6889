"""What simulated instances share (planner/simulator.py): the cores of two instances on the
same cores, and the first pipeline stage of one instance's pp virtual engines.

Shared cores (`num_shared_decode` k): decode instances num_decode..num_decode+k-1 run on the
cores of prefill instances 0..k-1 (planner.deployment.with_decode_on_prefill_cores: where
prefill idles, its cores decode). The OS time-slices the two processes, modelled as processor
sharing: while both instances have a step in flight, each progresses at half speed, so a step
ends when its latency-model time of work is done (`SharedCores`). The router sees only each
instance's own state (as the servers), so the slow-down is what no prediction sees; like the
dispatcher on such a deployment, it takes a local option that meets both SLOs first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.core.scheduler import Batch
    from planner.simulator import Simulator, _Engine


class SharedCores:
    """Cores that two instances share: processor sharing, as the OS time-slices their
    processes. Each step in flight has its latency-model time of work left; with n steps in
    flight each progresses at 1/n speed. Every change re-plans the ends (`version`: older
    planned ends are void)."""

    def __init__(self) -> None:
        self.active: dict[_Engine, list] = {}     # engine -> [work left (s), its batch]
        self.since = 0.0
        self.version = 0

    def _advance(self, now: float) -> None:
        if self.active:
            done = (now - self.since) / len(self.active)
            for entry in self.active.values():
                entry[0] -= done
        self.since = now

    def start(self, sim: Simulator, e: _Engine, work: float, batch: Batch) -> None:
        self._advance(sim.now)
        self.active[e] = [work, batch]
        self._plan(sim)

    def end(self, sim: Simulator, e: _Engine) -> Batch:
        self._advance(sim.now)
        batch = self.active.pop(e)[1]
        self._plan(sim)
        return batch

    def _plan(self, sim: Simulator) -> None:
        self.version += 1
        n = len(self.active)
        for e, (left, _) in self.active.items():
            sim._at(sim.now + max(0.0, left) * n, sim._shared_step_done, self, self.version, e)


class Stage:
    """The first pipeline stage of one instance, shared by its pp virtual engines: one batch
    at a time enters it and holds it for the latency model's (per-stage) time; the batch is
    done pp stage times later, so pp batches can be in flight but none is faster than at pp 1."""

    def __init__(self, pp: int) -> None:
        self.pp = pp
        self.busy = False
        self.engines: list[_Engine] = []
