"""Dispatch policy: which instance of a phase takes a request (pure policy: no Triton, no clock).

The simulator calls this to place each simulated request; the orchestrator is to call the same
function once each instance is addressable on its own (Triton round-robins over the instances
of one model and cannot be told which).
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
