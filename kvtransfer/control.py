"""The control block shared by a prefill instance and every decode instance that reads its pool.

Layout of a segment (all little-endian, offsets in bytes):

    0      header (HEADER_NBYTES = 512): magic, format version, transport, state (open/closed),
           creator pid, the KVLayout, the instance id, pool offset and size, and for
           cuda_ipc the pool's memory and event IPC handles (so forged handles are refused)
    512    owner[num_blocks]    int64: lease id granted on block b, 0 = not granted
                                (written only by the prefill side)
    512+8n released[num_blocks] int64: lease id whose copy of block b the decode side finished
                                (written only by the decode side)
    P      the KV pool itself (shm transport only; P = the control part rounded up to a page)

Lifecycle of a lease, seen from the table: prefill `grant` sets owner[b] = L on the request's
blocks -> a decode instance checks owner[b] == L on every block, copies, checks again (a
seqlock: the prefill side clears owner[b] before it reuses a block, so a reclaim during the
copy shows up), then sets released[b] = L -> prefill `collect_released` sees released[b] == L on
all blocks, clears owner[b] and frees the blocks. `expire`/`revoke` clear owner[b] without a
release. Lease ids are random 63-bit numbers, so a stale released[b] never matches a new lease
and each array keeps a single writer.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

from backends.core.kv_cache import KVLayout
from kvtransfer.descriptor import TRANSPORTS, KVDescriptor
from kvtransfer.errors import LeaseError, SegmentError, TransferAborted

MAGIC = b"DSKVPOOL"
VERSION = 1
HEADER_NBYTES = 512
STATE_OPEN, STATE_CLOSED = 1, 2
_STATE_OFFSET = 20
# magic, version, header_nbytes, transport, state, creator_pid, num_blocks, num_layers, block_size,
# num_kv_heads, head_dim, dtype, instance_id, pool_offset, pool_nbytes, ipc_mem_handle,
# ipc_event_handle
_HEADER = struct.Struct("<8sIIIIQQIIII16s64sQQ64s64s")
_TRANSPORT_CODES = {name: i + 1 for i, name in enumerate(TRANSPORTS)}


@dataclass(frozen=True)
class SegmentHeader:
    transport: str
    layout: KVLayout
    instance_id: str
    creator_pid: int
    pool_offset: int       # 0 when the pool lives elsewhere (cuda_ipc: device memory)
    pool_nbytes: int
    state: int = STATE_OPEN
    ipc_mem_handle: str = ""     # hex, cuda_ipc only
    ipc_event_handle: str = ""

    def __post_init__(self) -> None:
        if self.transport not in _TRANSPORT_CODES:
            raise ValueError(f"unknown transport {self.transport!r}")
        if len(self.instance_id.encode()) > 64:
            raise ValueError("instance_id must be at most 64 bytes")
        handles = (self.ipc_mem_handle, self.ipc_event_handle)
        wanted = 128 if self.transport == "cuda_ipc" else 0
        if any(len(h) != wanted for h in handles):
            raise ValueError(f"a {self.transport} header needs {wanted}-character IPC handles")

    def pack(self) -> bytes:
        lay = self.layout
        return _HEADER.pack(MAGIC, VERSION, HEADER_NBYTES, _TRANSPORT_CODES[self.transport],
                            self.state, self.creator_pid, lay.num_blocks, lay.num_layers,
                            lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype.encode(),
                            self.instance_id.encode(), self.pool_offset, self.pool_nbytes,
                            bytes.fromhex(self.ipc_mem_handle), bytes.fromhex(self.ipc_event_handle))

    @classmethod
    def unpack(cls, buf: bytes | memoryview | mmap.mmap) -> SegmentHeader:
        if len(buf) < HEADER_NBYTES:
            raise SegmentError(f"segment too small for a header ({len(buf)} bytes)")
        (magic, version, header_nbytes, transport, state, pid, num_blocks, num_layers, block_size,
         num_kv_heads, head_dim, dtype, instance_id, pool_offset, pool_nbytes, mem_handle,
         event_handle) = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise SegmentError(f"not a distserve KV segment (magic {magic!r})")
        if version != VERSION or header_nbytes != HEADER_NBYTES:
            raise SegmentError(f"segment format version {version} (header {header_nbytes} bytes); "
                               f"this build reads version {VERSION}")
        names = {code: name for name, code in _TRANSPORT_CODES.items()}
        try:
            layout = KVLayout(num_blocks, num_layers, block_size, num_kv_heads, head_dim,
                              dtype.rstrip(b"\0").decode())
            transport = names[transport]
            handles = (mem_handle.hex(), event_handle.hex()) if transport == "cuda_ipc" else ("", "")
            return cls(transport, layout, instance_id.rstrip(b"\0").decode(), pid,
                       pool_offset, pool_nbytes, state, *handles)
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise SegmentError(f"corrupt segment header: {e}") from None


def control_nbytes(num_blocks: int) -> int:
    return HEADER_NBYTES + 2 * 8 * num_blocks


def segment_geometry(transport: str, layout: KVLayout) -> tuple[int, int]:
    """(pool_offset, total segment bytes). The pool starts on a page boundary so it can be
    mapped on its own (read-only on the decode side)."""
    ctrl = control_nbytes(layout.num_blocks)
    if transport != "shm":
        return 0, ctrl
    page = mmap.ALLOCATIONGRANULARITY
    pool_offset = -(-ctrl // page) * page
    return pool_offset, pool_offset + layout.nbytes


def mark_closed(buf: mmap.mmap) -> None:
    struct.pack_into("<I", buf, _STATE_OFFSET, STATE_CLOSED)


class ControlTable:
    """owner/released arrays over the segment's buffer (no copies)."""

    def __init__(self, buf: mmap.mmap, num_blocks: int) -> None:
        self.owner = np.frombuffer(buf, dtype="<i8", count=num_blocks, offset=HEADER_NBYTES)
        self.released = np.frombuffer(buf, dtype="<i8", count=num_blocks,
                                      offset=HEADER_NBYTES + 8 * num_blocks)

    def release(self) -> None:
        """Drop the views so the buffer can be closed."""
        self.owner = self.released = np.empty(0, dtype="<i8")


def same_block_format(a: KVLayout, b: KVLayout) -> bool:
    """Blocks of `a` can be copied into a pool of `b` (same model and block size)."""
    return (a.num_layers, a.block_size, a.num_kv_heads, a.head_dim, a.dtype) == \
           (b.num_layers, b.block_size, b.num_kv_heads, b.head_dim, b.dtype)


def check_header(header: SegmentHeader, desc: KVDescriptor) -> None:
    """The segment is the pool the descriptor claims, still open. SegmentError otherwise."""
    if header.state != STATE_OPEN:
        raise SegmentError(f"prefill pool {desc.pool_name} is closed "
                           f"(instance {header.instance_id} shut down)")
    if header.transport != desc.transport:
        raise SegmentError(f"segment {desc.pool_name} is a {header.transport} pool, "
                           f"descriptor says {desc.transport}")
    if header.instance_id != desc.instance_id:
        raise SegmentError(f"segment {desc.pool_name} belongs to instance {header.instance_id!r}, "
                           f"descriptor says {desc.instance_id!r}")
    if header.layout != desc.layout:
        raise SegmentError(f"segment layout {header.layout} differs from the descriptor's {desc.layout}")
    if desc.transport == "cuda_ipc" and (header.ipc_mem_handle, header.ipc_event_handle) != \
            (desc.ipc_mem_handle, desc.ipc_event_handle):
        raise SegmentError(f"descriptor's IPC handles are not those of pool {desc.pool_name}")


def _first_mismatch(owner: np.ndarray, desc: KVDescriptor) -> tuple[int, int] | None:
    ids = np.asarray(desc.block_ids, dtype=np.int64)
    seen = owner[ids]
    bad = np.flatnonzero(seen != desc.lease_id)
    if bad.size == 0:
        return None
    return int(ids[bad[0]]), int(seen[bad[0]])


def _lease_problem(desc: KVDescriptor, block: int, owner: int) -> str:
    if owner == 0:
        return (f"lease {desc.lease_id} is not granted on block {block} of {desc.pool_name}: "
                "it expired, was revoked or was already released")
    return (f"block {block} of {desc.pool_name} is granted to a different lease than {desc.lease_id} "
            "(a wrong lease id, or the block was reclaimed and reused)")


def check_granted(table: ControlTable, desc: KVDescriptor) -> None:
    """Before any read: every block is granted to this lease, which nobody has fetched yet
    (a lease is good for one fetch: a replayed descriptor is stale). LeaseError otherwise."""
    mismatch = _first_mismatch(table.owner, desc)
    if mismatch:
        raise LeaseError(_lease_problem(desc, *mismatch))
    ids = np.asarray(desc.block_ids, dtype=np.int64)
    if np.any(table.released[ids] == desc.lease_id):
        raise LeaseError(f"lease {desc.lease_id} on {desc.pool_name} was already fetched and "
                         "released: the descriptor is stale")


def check_still_granted(table: ControlTable, desc: KVDescriptor) -> None:
    """After the copy: nothing was reclaimed meanwhile. TransferAborted otherwise."""
    mismatch = _first_mismatch(table.owner, desc)
    if mismatch:
        raise TransferAborted("copy discarded, the prefill side reclaimed the blocks during it: "
                              + _lease_problem(desc, *mismatch))


def mark_released(table: ControlTable, desc: KVDescriptor) -> None:
    table.released[np.asarray(desc.block_ids, dtype=np.int64)] = desc.lease_id
