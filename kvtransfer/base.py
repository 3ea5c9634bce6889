"""The transport interface: a prefill-side exporter and a decode-side importer.

Lifecycle of one request's KV: prefill `exporter.grant(block_ids, num_tokens)` -> descriptor
JSON through Triton -> decode `importer.fetch(desc, dst_block_ids)` (or `importer.release(desc)`
if the request was cancelled before admission) -> prefill `exporter.collect_released()` frees
the blocks; `exporter.expire()` reclaims leases nobody fetched; `close()` on both sides.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.control import (check_granted, check_still_granted, mark_released,
                                same_block_format)
from kvtransfer.descriptor import KVDescriptor


@dataclass(frozen=True)
class TransferStats:
    num_bytes: int
    seconds: float

    def __post_init__(self) -> None:
        if self.num_bytes < 0 or self.seconds < 0:
            raise ValueError(f"TransferStats must be non-negative, got {self.num_bytes}, {self.seconds}")

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVExporter(ABC):
    """Prefill side: owns a KV pool other processes can read, and the leases on its blocks."""
    kind: ClassVar[str]

    @property
    @abstractmethod
    def pool(self) -> KVPool:
        """The pool the model writes its KV into."""

    @property
    @abstractmethod
    def pool_name(self) -> str:
        """The pool's shm segment name (for cuda_ipc: its control segment)."""

    @property
    @abstractmethod
    def num_leases(self) -> int:
        """Leases granted and not yet collected, expired or revoked."""

    @abstractmethod
    def grant(self, block_ids: Sequence[int], num_tokens: int, now: float | None = None) -> KVDescriptor:
        """Lend `block_ids` (holding `num_tokens` tokens of KV) to one decode fetch.

        Args: now: the grant time for expiry (default time.monotonic()).
        Returns: the descriptor to send to decode.
        """

    @abstractmethod
    def collect_released(self) -> list[int]:
        """Lease ids whose blocks decode has copied: those blocks may be freed now."""

    @abstractmethod
    def expire(self, now: float | None = None) -> list[int]:
        """Lease ids granted more than lease_timeout_s before `now` and never released: their
        blocks are reclaimed and may be freed now."""

    @abstractmethod
    def revoke(self, lease_id: int) -> tuple[int, ...]:
        """End a lease now (request cancelled). Returns its block ids, () if not outstanding."""

    @abstractmethod
    def close(self) -> None:
        """Invalidate every lease, release the pool and its memory. Idempotent."""

    def __enter__(self) -> KVExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseBackedExporter(KVExporter):
    """The parts every exporter shares: a pool, a LeaseGranter and a close finalizer.
    Subclasses set `_pool`, `_leases` and `_finalizer`, and implement `pool_name` and `grant`."""
    _pool: KVPool
    _leases: Any
    _finalizer: Any

    @property
    def pool(self) -> KVPool:
        return self._pool

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"KV exporter {self.pool_name} is closed")

    def collect_released(self) -> list[int]:
        self._check_open()
        return self._leases.collect_released()

    def expire(self, now: float | None = None) -> list[int]:
        self._check_open()
        return self._leases.expire(time.monotonic() if now is None else now)

    def revoke(self, lease_id: int) -> tuple[int, ...]:
        self._check_open()
        return self._leases.revoke(lease_id)

    def close(self) -> None:
        self._finalizer()


class KVImporter(ABC):
    """Decode side: copies leased blocks from prefill pools into its own pool."""
    kind: ClassVar[str]

    @abstractmethod
    def fetch(self, desc: KVDescriptor, dst_block_ids: Sequence[int], skip_blocks: int = 0
              ) -> TransferStats:
        """Copy the descriptor's blocks into `dst_block_ids` of our pool, then release the lease.
        `skip_blocks`: the first blocks are not copied (we hold their K/V already: a prefix
        cache hit), so `dst_block_ids` takes the rest; the lease covers them all either way.

        Raises: LeaseError (nothing read) if the lease is not granted on every block,
            TransferAborted if it was reclaimed mid-copy (dst blocks hold garbage: free them),
            SegmentError / InvalidDescriptor / ValueError if pool or descriptor do not match.
        """

    @abstractmethod
    def release(self, desc: KVDescriptor) -> None:
        """Give a lease back without copying (request cancelled before admission)."""

    @abstractmethod
    def close(self) -> None:
        """Unmap every prefill pool. Idempotent."""

    def __enter__(self) -> KVImporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseCheckedImporter(KVImporter):
    """The fetch protocol every importer shares: check the destination, check the lease on
    every block, copy, check the lease again (a reclaim mid-copy aborts), mark it released.
    Subclasses set `dst_pool` and `_sources` (a SourceCache) and implement `_copy`."""
    dst_pool: KVPool
    _sources: Any

    @property
    def attached(self) -> list[str]:
        return self._sources.names

    def _source(self, desc: KVDescriptor) -> Any:
        return self._sources.get(desc)

    @abstractmethod
    def _copy(self, src: Any, desc: KVDescriptor, src_ids: tuple[int, ...],
              dst_ids: tuple[int, ...]) -> None:
        """Copy blocks `src_ids` (the descriptor's, or its tail) from `src` into `dst_ids` of
        our pool."""

    def fetch(self, desc: KVDescriptor, dst_block_ids: Sequence[int], skip_blocks: int = 0
              ) -> TransferStats:
        start = time.perf_counter()
        dst_ids = check_destination(desc, self.dst_pool.layout, dst_block_ids, skip_blocks)
        src_ids = desc.block_ids[skip_blocks:]
        with self._sources.lock:
            src = self._source(desc)
            check_granted(src.segment.table, desc)
            self._copy(src, desc, src_ids, dst_ids)
            check_still_granted(src.segment.table, desc)
            mark_released(src.segment.table, desc)
        return TransferStats(len(src_ids) * desc.layout.block_nbytes, time.perf_counter() - start)

    def release(self, desc: KVDescriptor) -> None:
        with self._sources.lock:
            src = self._source(desc)
            check_granted(src.segment.table, desc)
            mark_released(src.segment.table, desc)

    def prune(self) -> list[str]:
        """Unmap prefill pools whose instance closed (also done whenever a new pool attaches)."""
        return self._sources.prune()


def check_destination(desc: KVDescriptor, dst: KVLayout, dst_block_ids: Sequence[int],
                      skip_blocks: int = 0) -> tuple[int, ...]:
    """The destination blocks can take the descriptor's blocks past the first `skip_blocks`.
    ValueError otherwise."""
    if desc.layout.dtype != dst.dtype:
        raise ValueError(f"KV dtype mismatch: the prefill pool {desc.pool_name} holds "
                         f"{desc.layout.dtype} KV, this decode pool holds {dst.dtype}; prefill "
                         "and decode must run with one kv_dtype")
    if not same_block_format(desc.layout, dst):
        raise ValueError(f"descriptor layout {desc.layout} is not block-compatible with the "
                         f"decode pool {dst} (different model, block size or dtype)")
    if isinstance(skip_blocks, bool) or not isinstance(skip_blocks, int) or \
            not 0 <= skip_blocks <= len(desc.block_ids):
        raise ValueError(f"skip_blocks must be an int in [0, {len(desc.block_ids)}], got {skip_blocks!r}")
    ids = tuple(dst_block_ids)
    if len(ids) != len(desc.block_ids) - skip_blocks:
        raise ValueError(f"{len(desc.block_ids) - skip_blocks} source blocks to copy "
                         f"({len(desc.block_ids)} less {skip_blocks} held already) but "
                         f"{len(ids)} destination blocks")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < dst.num_blocks for b in ids):
        raise ValueError(f"destination block ids must be ints in [0, {dst.num_blocks})")
    if len(set(ids)) != len(ids):
        raise ValueError("destination block ids contain duplicates")
    return ids
