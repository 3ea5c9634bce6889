"""Hold finished decoupled BLS response iterators for a while before letting them go.

The python backend of Triton 2.51 (r24.10) keeps each decoupled BLS stream's iterator in a map
that a C++ thread of the stub clears some time after the stream's last response (its cleanup
message, `Stub::SendCleanupId`). Where that erase drops the last reference, the iterator and
its responses' tensors are destroyed on that thread without the GIL, and a tensor's numpy
array released without the GIL can corrupt the heap (fixed upstream in python_backend PR #390,
r24.12: "When deleting NumPy arrays in C++, GIL must be held"). Our orchestrator's stub died
under load with "malloc_consolidate(): unaligned fastbin chunk detected" and with segfaults in
no Python frame (docs/multiturn_amd.md, twelfth session). Keeping our own reference for
`keep_s` after the stream ends makes the C++ erase not the last one, so the iterator is freed
here, by a Python thread, holding the GIL. Unproven as the crash's cause: it removes one
mechanism that fits it.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

KEEP_S = 30.0           # far past the cleanup thread's lag under load (seconds at most, seen)


class Keeper:
    """`hold(obj)`: keep a reference to `obj` for `keep_s` seconds (any thread); references
    whose time is up are dropped by the next `hold`, on the caller's thread (with the GIL)."""

    def __init__(self, keep_s: float = KEEP_S, clock=time.monotonic) -> None:
        self.keep_s, self.clock = keep_s, clock
        self._held: collections.deque[tuple[float, Any]] = collections.deque()
        self._lock = threading.Lock()

    def hold(self, obj: Any) -> None:
        now = self.clock()
        expired = []
        with self._lock:
            self._held.append((now + self.keep_s, obj))
            while self._held and self._held[0][0] <= now:
                expired.append(self._held.popleft())
        del expired             # the last references, dropped here, outside the lock

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
