"""backends/serving/bls_keep.Keeper: a finished BLS stream's iterator stays referenced for its
hold time, then goes when a later stream is held (on that caller's thread)."""
from __future__ import annotations

import gc
import threading
import weakref

from backends.serving.bls_keep import Keeper


class Stream:
    """Stands in for a response iterator: anything weak-referenceable."""


def test_held_until_its_time_is_up_then_dropped_by_a_later_hold():
    now = [100.0]
    keep = Keeper(keep_s=30.0, clock=lambda: now[0])
    first = Stream()
    ref = weakref.ref(first)
    keep.hold(first)
    del first
    gc.collect()
    assert ref() is not None and len(keep) == 1          # ours is the only reference left
    now[0] += 29.0
    keep.hold(Stream())
    assert ref() is not None and len(keep) == 2          # not yet
    now[0] += 1.0
    keep.hold(Stream())
    assert ref() is None and len(keep) == 2              # dropped by this hold, on this thread


def test_holds_from_many_threads_keep_every_reference():
    keep = Keeper(keep_s=60.0)
    streams = [Stream() for _ in range(400)]
    refs = [weakref.ref(s) for s in streams]
    threads = [threading.Thread(target=lambda part=streams[i::8]: [keep.hold(s) for s in part])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del streams, threads
    gc.collect()
    assert len(keep) == 400 and all(r() is not None for r in refs)
