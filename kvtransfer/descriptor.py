"""KV descriptor: the small message a prefill instance answers with instead of the KV bytes.

Lifecycle: the prefill side's exporter builds one in `grant()` and sends `to_json()` through
Triton; the decode side parses it with `KVDescriptor.from_json()` (strict: anything malformed,
forged or absurd raises `InvalidDescriptor` before a segment is even opened), then hands it to
its importer's `fetch()`. The descriptor names the pool (a shm segment name following
`POOL_NAME_RE`), the layout, the blocks and the lease that protects them.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal, get_args

from backends.core.kv_cache import KVLayout
from kvtransfer.errors import InvalidDescriptor

Transport = Literal["shm", "cuda_ipc"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)

SEGMENT_PREFIX = "distserve-kv-"
POOL_NAME_RE = re.compile(r"^distserve-kv-(\d{1,10})-([0-9a-f]{16})$")
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
IPC_HANDLE_HEX_LEN = 128  # cudaIpcMemHandle_t / cudaIpcEventHandle_t: 64 bytes each
_HEX_RE = re.compile(r"^[0-9a-f]+$")

MAX_JSON_BYTES = 64 * 1024
MAX_BLOCKS_PER_LEASE = 8192
MAX_NUM_BLOCKS = 1 << 24
MAX_DIM = 1 << 16
MAX_POOL_BYTES = 1 << 40
MAX_LEASE_ID = (1 << 63) - 1

_LAYOUT_INTS = ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim")
_KEYS = {"transport", "instance_id", "pool_name", "layout", "block_ids", "num_tokens",
         "lease_id", "ipc_mem_handle", "ipc_event_handle"}


def new_lease_id() -> int:
    """A random 63-bit lease id, never 0 (0 marks a block as not granted)."""
    while True:
        lease_id = secrets.randbits(63)
        if lease_id:
            return lease_id


def make_pool_name() -> str:
    """An unguessable segment name: our uid plus 64 random bits."""
    return f"{SEGMENT_PREFIX}{os.geteuid()}-{secrets.token_hex(8)}"


def check_pool_name(name: object) -> str:
    """The name if it follows our pattern and belongs to this uid, else InvalidDescriptor."""
    if not isinstance(name, str) or not POOL_NAME_RE.match(name):
        raise InvalidDescriptor(f"pool_name {str(name)[:80]!r} does not match {POOL_NAME_RE.pattern}")
    uid = int(POOL_NAME_RE.match(name).group(1))
    if uid != os.geteuid():
        raise InvalidDescriptor(f"pool_name {name!r} belongs to uid {uid}, we are uid {os.geteuid()}")
    return name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layout_from_dict(raw: object) -> KVLayout:
    if not isinstance(raw, dict) or set(raw) != {*_LAYOUT_INTS, "dtype"}:
        raise InvalidDescriptor(f"layout must be an object with keys {[*_LAYOUT_INTS, 'dtype']}")
    for name in _LAYOUT_INTS:
        value, limit = raw[name], MAX_NUM_BLOCKS if name == "num_blocks" else MAX_DIM
        if not _is_int(value) or not 0 < value <= limit:
            raise InvalidDescriptor(f"layout.{name} must be an int in [1, {limit}], got {value!r}")
    if not isinstance(raw["dtype"], str):
        raise InvalidDescriptor(f"layout.dtype must be a string, got {raw['dtype']!r}")
    try:
        layout = KVLayout(**raw)
    except ValueError as e:
        raise InvalidDescriptor(f"bad layout: {e}") from None
    if layout.nbytes > MAX_POOL_BYTES:
        raise InvalidDescriptor(f"layout describes a {layout.nbytes}-byte pool (> {MAX_POOL_BYTES})")
    return layout


def layout_to_dict(layout: KVLayout) -> dict[str, Any]:
    return {name: getattr(layout, name) for name in (*_LAYOUT_INTS, "dtype")}


@dataclass(frozen=True)
class KVDescriptor:
    """Where a request's KV lives on a prefill instance and which lease protects it."""
    transport: Transport
    instance_id: str
    pool_name: str                 # shm segment name (for cuda_ipc: the control segment)
    layout: KVLayout
    block_ids: tuple[int, ...]
    num_tokens: int
    lease_id: int
    ipc_mem_handle: str | None = None     # cuda_ipc only: hex cudaIpcMemHandle_t
    ipc_event_handle: str | None = None   # cuda_ipc only: hex cudaIpcEventHandle_t

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise InvalidDescriptor(f"unknown transport {self.transport!r}; valid: {', '.join(TRANSPORTS)}")
        if not isinstance(self.instance_id, str) or not INSTANCE_ID_RE.match(self.instance_id):
            raise InvalidDescriptor(f"instance_id {self.instance_id!r} must match {INSTANCE_ID_RE.pattern}")
        check_pool_name(self.pool_name)
        if not isinstance(self.layout, KVLayout):
            raise InvalidDescriptor(f"layout must be a KVLayout, got {type(self.layout).__name__}")
        if not _is_int(self.lease_id) or not 0 < self.lease_id <= MAX_LEASE_ID:
            raise InvalidDescriptor(f"lease_id must be an int in [1, 2**63-1], got {self.lease_id!r}")
        self._check_blocks()
        self._check_handles()

    def _check_blocks(self) -> None:
        ids, layout = self.block_ids, self.layout
        if not _is_int(self.num_tokens) or self.num_tokens <= 0:
            raise InvalidDescriptor(f"num_tokens must be a positive int, got {self.num_tokens!r}")
        if not isinstance(ids, tuple) or not all(_is_int(b) for b in ids):
            raise InvalidDescriptor("block_ids must be a tuple of ints")
        if len(ids) > MAX_BLOCKS_PER_LEASE:
            raise InvalidDescriptor(f"{len(ids)} block ids (> {MAX_BLOCKS_PER_LEASE} per lease)")
        if len(ids) != layout.num_blocks_for(self.num_tokens):
            raise InvalidDescriptor(f"{self.num_tokens} tokens need {layout.num_blocks_for(self.num_tokens)} "
                                    f"blocks of {layout.block_size}, descriptor lists {len(ids)}")
        bad = [b for b in ids if not 0 <= b < layout.num_blocks]
        if bad:
            raise InvalidDescriptor(f"block ids {bad[:8]} out of range [0, {layout.num_blocks})")
        if len(set(ids)) != len(ids):
            raise InvalidDescriptor("block_ids contain duplicates")

    def _check_handles(self) -> None:
        handles = {"ipc_mem_handle": self.ipc_mem_handle, "ipc_event_handle": self.ipc_event_handle}
        for name, value in handles.items():
            if self.transport != "cuda_ipc":
                if value is not None:
                    raise InvalidDescriptor(f"{name} is only valid for transport 'cuda_ipc'")
            elif not (isinstance(value, str) and len(value) == IPC_HANDLE_HEX_LEN and _HEX_RE.match(value)):
                raise InvalidDescriptor(f"{name} must be {IPC_HANDLE_HEX_LEN} lowercase hex characters")

    @property
    def num_bytes(self) -> int:
        return len(self.block_ids) * self.layout.block_nbytes

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "transport": self.transport, "instance_id": self.instance_id, "pool_name": self.pool_name,
            "layout": layout_to_dict(self.layout), "block_ids": list(self.block_ids),
            "num_tokens": self.num_tokens, "lease_id": self.lease_id}
        if self.transport == "cuda_ipc":
            raw["ipc_mem_handle"], raw["ipc_event_handle"] = self.ipc_mem_handle, self.ipc_event_handle
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> KVDescriptor:
        """Parse and validate; any violation raises InvalidDescriptor (a ValueError)."""
        if not isinstance(text, (str, bytes)):
            raise InvalidDescriptor(f"descriptor must be str or bytes, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise InvalidDescriptor(f"descriptor is {len(text)} bytes (> {MAX_JSON_BYTES})")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidDescriptor(f"descriptor is not valid JSON: {str(e)[:120]}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: object) -> KVDescriptor:
        """Validate a decoded descriptor (e.g. nested in a message); InvalidDescriptor if bad."""
        if not isinstance(raw, dict):
            raise InvalidDescriptor("descriptor must be a JSON object")
        required = _KEYS - {"ipc_mem_handle", "ipc_event_handle"}
        if not required <= set(raw) <= _KEYS:
            raise InvalidDescriptor(f"descriptor keys {sorted(raw)[:12]} must be {sorted(required)} "
                                    "plus the ipc handles for cuda_ipc")
        ids = raw["block_ids"]
        if not isinstance(ids, list) or len(ids) > MAX_BLOCKS_PER_LEASE:
            raise InvalidDescriptor(f"block_ids must be a list of at most {MAX_BLOCKS_PER_LEASE} ints")
        return cls(transport=raw["transport"], instance_id=raw["instance_id"],
                   pool_name=raw["pool_name"], layout=layout_from_dict(raw["layout"]),
                   block_ids=tuple(ids), num_tokens=raw["num_tokens"], lease_id=raw["lease_id"],
                   ipc_mem_handle=raw.get("ipc_mem_handle"), ipc_event_handle=raw.get("ipc_event_handle"))
