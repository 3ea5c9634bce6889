"""Dispatch policy: which instance of a phase takes a request (pure policy: no Triton, no clock).

The simulator calls this to place each simulated request; the orchestrator calls the same
function (backends/orchestrator/health.InstanceMonitor.place) over the live instances of a
phase, each a Triton model of its own.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def least_loaded(instances: Sequence[T], load: Callable[[T], int]) -> T:
    """The instance with the least load; ties go to the earliest in `instances`."""
    if not instances:
        raise ValueError("no instance to dispatch to")
    best, best_load = instances[0], load(instances[0])
    for inst in instances[1:]:
        n = load(inst)
        if n < best_load:
            best, best_load = inst, n
    return best
