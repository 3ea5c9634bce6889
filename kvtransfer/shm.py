"""Shared-memory KV transport (CPU, same host).

Lifecycle: a prefill instance builds `ShmKVExporter(layout, instance_id)`, which creates one
0600 segment holding the lease table and the KV pool (`.pool`, where the model writes) ->
`grant(block_ids, num_tokens)` per finished prefill returns the descriptor -> a decode instance's
`ShmKVImporter(dst_pool).fetch(desc, dst_block_ids)` attaches to that segment once (cached),
validates header and lease, copies the blocks (one memcpy per run of adjacent blocks),
re-checks the lease and marks the blocks released -> the prefill side's `collect_released()` /
`expire()` hand the blocks back to its allocator -> `close()` on both sides (the exporter's
close also runs at exit or when it is garbage collected, so no /dev/shm entry outlives the
process unless it is SIGKILLed; see `segment.reap_stale_segments`).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import numpy as np

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.base import LeaseBackedExporter, LeaseCheckedImporter
from kvtransfer.blockcopy import block_bytes, copy_blocks
from kvtransfer.descriptor import KVDescriptor
from kvtransfer.lease import DEFAULT_LEASE_TIMEOUT_S, LeaseGranter, check_exporter_args
from kvtransfer.segment import Segment
from kvtransfer.sources import SourceCache

def _close_exporter(pool: KVPool, segment: Segment) -> None:
    pool.release()
    segment.close()


class ShmKVExporter(LeaseBackedExporter):
    kind = "shm"

    def __init__(self, layout: KVLayout, instance_id: str,
                 lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> None:
        check_exporter_args(instance_id, lease_timeout_s)
        self.layout, self.instance_id = layout, instance_id
        self._segment = Segment.create("shm", layout, instance_id)
        try:
            self._pool = KVPool(layout, buffer=self._segment.buffer)
        except BaseException:
            self._segment.close()
            raise
        self._leases = LeaseGranter(self._segment.table, layout, lease_timeout_s)
        self._finalizer = weakref.finalize(self, _close_exporter, self._pool, self._segment)

    @property
    def pool_name(self) -> str:
        return self._segment.name

    def grant(self, block_ids: Sequence[int], num_tokens: int, now: float | None = None) -> KVDescriptor:
        self._check_open()
        lease = self._leases.grant(block_ids, num_tokens, time.monotonic() if now is None else now)
        return KVDescriptor("shm", self.instance_id, self.pool_name, self.layout, lease.block_ids,
                            num_tokens, lease.lease_id)


class _Source:
    """An attached prefill segment and a read-only [num_blocks, block_nbytes] view of its pool."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        layout = segment.header.layout
        flat = np.frombuffer(segment.buffer, dtype=np.uint8)
        self.blocks = flat.reshape(layout.num_blocks, layout.block_nbytes)

    def close(self) -> None:
        self.blocks = np.empty((0, 0), dtype=np.uint8)
        self.segment.close()


def _attach(desc: KVDescriptor) -> _Source:
    return _Source(Segment.attach(desc.pool_name, desc.transport, desc.layout))


class ShmKVImporter(LeaseCheckedImporter):
    kind = "shm"

    def __init__(self, dst_pool: KVPool, max_attached: int = 64) -> None:
        if dst_pool.data.device.type != "cpu" or not dst_pool.data.is_contiguous():
            raise ValueError("the shm transport needs a contiguous CPU destination pool")
        self.dst_pool = dst_pool
        self._dst_blocks = block_bytes(dst_pool.data)
        self._sources: SourceCache[_Source] = SourceCache(self.kind, _attach, max_attached)

    def _copy(self, src: _Source, desc: KVDescriptor, src_ids: tuple[int, ...],
              dst_ids: tuple[int, ...]) -> None:
        copy_blocks(src.blocks, self._dst_blocks, src_ids, dst_ids)

    def close(self) -> None:
        self._sources.close()
