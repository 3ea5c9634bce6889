"""Prefill-side leases: which blocks are lent to decode, since when, and when to take them back.

Lifecycle: `grant` picks a fresh random lease id and writes it into owner[b] for the request's
blocks -> the descriptor travels to decode -> `collect_released` returns the leases whose every
block decode has marked released (their blocks may be freed), `expire(now)` returns leases
older than `lease_timeout_s` that were never released (decode never came: blocks reclaimed),
`revoke` ends one lease at once (request cancelled). In every ending owner[b] is cleared first,
before the caller may reuse the blocks: that is what lets a decode copy detect a reclaim.

`LeaseBook` is the pure policy (no clock, no memory): tests drive it with a fake `now`.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backends.core.kv_cache import KVLayout
from kvtransfer.control import ControlTable
from kvtransfer.descriptor import INSTANCE_ID_RE, MAX_BLOCKS_PER_LEASE, new_lease_id

DEFAULT_LEASE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Lease:
    lease_id: int
    block_ids: tuple[int, ...]
    granted_at: float

    def __post_init__(self) -> None:
        if self.lease_id <= 0:
            raise ValueError(f"lease_id must be > 0, got {self.lease_id}")
        if not self.block_ids:
            raise ValueError("a lease needs at least one block")


class LeaseBook:
    """Outstanding leases and their grant times. Pure policy: the clock is passed in."""

    def __init__(self, lease_timeout_s: float) -> None:
        if not lease_timeout_s > 0:
            raise ValueError(f"lease_timeout_s must be > 0, got {lease_timeout_s}")
        self.lease_timeout_s = lease_timeout_s
        self._leases: dict[int, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def add(self, lease: Lease) -> None:
        if lease.lease_id in self._leases:
            raise ValueError(f"lease {lease.lease_id} already outstanding")
        self._leases[lease.lease_id] = lease

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def pop(self, lease_id: int) -> Lease | None:
        return self._leases.pop(lease_id, None)

    def expired(self, now: float) -> list[Lease]:
        """Leases granted more than lease_timeout_s before `now`, oldest first."""
        old = [lease for lease in self._leases.values() if now - lease.granted_at > self.lease_timeout_s]
        return sorted(old, key=lambda lease: lease.granted_at)


def check_exporter_args(instance_id: str, lease_timeout_s: float) -> None:
    if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
        raise ValueError(f"instance_id {instance_id!r} must match {INSTANCE_ID_RE.pattern}")
    if not lease_timeout_s > 0:
        raise ValueError(f"lease_timeout_s must be > 0, got {lease_timeout_s}")


def check_grant(layout: KVLayout, block_ids: Sequence[int], num_tokens: int) -> tuple[int, ...]:
    ids = tuple(block_ids)
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in ids):
        raise ValueError("block_ids must be ints")
    if not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if len(ids) != layout.num_blocks_for(num_tokens):
        raise ValueError(f"{num_tokens} tokens need {layout.num_blocks_for(num_tokens)} blocks, "
                         f"got {len(ids)}")
    if len(ids) > MAX_BLOCKS_PER_LEASE:
        raise ValueError(f"{len(ids)} blocks in one lease (> {MAX_BLOCKS_PER_LEASE})")
    if len(set(ids)) != len(ids) or not all(0 <= b < layout.num_blocks for b in ids):
        raise ValueError(f"block_ids must be unique and in [0, {layout.num_blocks})")
    return ids


class LeaseGranter:
    """The prefill side of a control table: the only writer of owner[]. Thread-safe."""

    def __init__(self, table: ControlTable, layout: KVLayout, lease_timeout_s: float) -> None:
        self.table = table
        self.layout = layout
        self.book = LeaseBook(lease_timeout_s)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.book)

    def grant(self, block_ids: Sequence[int], num_tokens: int, now: float) -> Lease:
        ids = check_grant(self.layout, block_ids, num_tokens)
        index = np.asarray(ids, dtype=np.int64)
        with self._lock:
            busy = index[self.table.owner[index] != 0]
            if busy.size:
                raise ValueError(f"blocks {busy[:8].tolist()} are already granted to another lease")
            lease = Lease(new_lease_id(), ids, now)
            self.book.add(lease)
            self.table.owner[index] = lease.lease_id
        return lease

    def _is_released(self, lease: Lease) -> bool:
        index = np.asarray(lease.block_ids, dtype=np.int64)
        return bool(np.all(self.table.released[index] == lease.lease_id))

    def _end(self, lease: Lease) -> None:
        self.book.pop(lease.lease_id)
        self.table.owner[np.asarray(lease.block_ids, dtype=np.int64)] = 0

    def collect_released(self) -> list[int]:
        with self._lock:
            done = [lease for lease in self.book.leases() if self._is_released(lease)]
            for lease in done:
                self._end(lease)
        return [lease.lease_id for lease in done]

    def expire(self, now: float) -> list[int]:
        """End leases past their timeout. Released-but-uncollected leases are left to collect."""
        with self._lock:
            old = [lease for lease in self.book.expired(now) if not self._is_released(lease)]
            for lease in old:
                self._end(lease)
        return [lease.lease_id for lease in old]

    def revoke(self, lease_id: int) -> tuple[int, ...]:
        """End one lease now; its block ids, or () if it is not outstanding."""
        with self._lock:
            lease = self.book.get(lease_id)
            if lease is None:
                return ()
            self._end(lease)
        return lease.block_ids

    def revoke_all(self) -> list[int]:
        with self._lock:
            leases = self.book.leases()
            for lease in leases:
                self._end(lease)
        return [lease.lease_id for lease in leases]
