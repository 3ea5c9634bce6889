"""The decode side's cache of attached prefill pools (one mapping per pool, reused by fetches).

Lifecycle of an entry: the first descriptor naming a pool attaches it (the transport's `attach`
does the security and format checks) -> later fetches reuse it after re-reading the header
(state, layout, instance, handles must still match the descriptor) -> it is detached when its
segment was unlinked (noticed on the next fetch for it, or by `prune()`, which also runs
whenever a new pool is attached), when more than `max_attached` pools are mapped (least
recently used first), or on `close()`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from kvtransfer.control import check_header
from kvtransfer.descriptor import KVDescriptor
from kvtransfer.segment import Segment


class Source(Protocol):
    segment: Segment

    def close(self) -> None: ...


S = TypeVar("S", bound=Source)


class SourceCache(Generic[S]):
    """Attached pools by name, LRU-bounded. Hold `lock` while using an entry: a detach never
    unmaps a pool another thread is copying from."""

    def __init__(self, kind: str, attach: Callable[[KVDescriptor], S], max_attached: int = 64) -> None:
        if max_attached <= 0:
            raise ValueError(f"max_attached must be > 0, got {max_attached}")
        self.kind, self.max_attached = kind, max_attached
        self._attach = attach
        self._sources: OrderedDict[str, S] = OrderedDict()
        self.lock = threading.RLock()
        self.closed = False

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def get(self, desc: KVDescriptor) -> S:
        """The attached, current, open pool named by `desc`, validated against it."""
        with self.lock:
            if self.closed:
                raise RuntimeError("KV importer is closed")
            if desc.transport != self.kind:
                raise ValueError(f"{self.kind} importer got a {desc.transport} descriptor")
            src = self._sources.get(desc.pool_name)
            if src is not None and not src.segment.is_current():
                self.detach(desc.pool_name)  # unlinked by its owner: drop our mapping
                src = None
            if src is None:
                self.prune()
                src = self._sources[desc.pool_name] = self._attach(desc)
                while len(self._sources) > self.max_attached:
                    self.detach(next(iter(self._sources)))
            self._sources.move_to_end(desc.pool_name)
            check_header(src.segment.read_header(), desc)
            return src

    def prune(self) -> list[str]:
        """Detach pools whose segment was unlinked (instance closed or gone)."""
        with self.lock:
            gone = [name for name, src in self._sources.items() if not src.segment.is_current()]
            for name in gone:
                self.detach(name)
            return gone

    def detach(self, pool_name: str) -> None:
        with self.lock:
            src = self._sources.pop(pool_name, None)
            if src is not None:
                src.close()

    def close(self) -> None:
        with self.lock:
            for name in list(self._sources):
                self.detach(name)
            self.closed = True
