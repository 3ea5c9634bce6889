"""KV descriptor: round trip, compactness, and every way a forged or malformed one is refused."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from backends.core.kv_cache import KVLayout
from kvtransfer import InvalidDescriptor, KVDescriptor
from kvtransfer.descriptor import make_pool_name, new_lease_id

LAYOUT = KVLayout(num_blocks=16, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8)
SMOLLM2 = KVLayout(num_blocks=4096, num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)
HANDLE = "ab" * 64


def make_desc(**changes) -> KVDescriptor:
    desc = KVDescriptor("shm", "prefill-0", make_pool_name(), LAYOUT, (0, 1, 2), 10, new_lease_id())
    return dataclasses.replace(desc, **changes)


def test_descriptor_round_trip_is_compact():
    desc = KVDescriptor("shm", "prefill-0", make_pool_name(), SMOLLM2, tuple(range(100, 132)), 512,
                        new_lease_id())
    text = desc.to_json()
    assert KVDescriptor.from_json(text) == desc
    assert KVDescriptor.from_json(text.encode()) == desc
    assert len(text) < 1024
    ipc = dataclasses.replace(desc, transport="cuda_ipc", ipc_mem_handle=HANDLE, ipc_event_handle="cd" * 64)
    assert KVDescriptor.from_json(ipc.to_json()) == ipc
    assert len(ipc.to_json()) < 1024 + 300


def test_int8_layout_round_trips_with_its_scales_in_the_block_bytes():
    int8 = dataclasses.replace(SMOLLM2, dtype="int8")
    desc = KVDescriptor("shm", "prefill-0", make_pool_name(), int8, (3, 4), 20, new_lease_id())
    back = KVDescriptor.from_json(desc.to_json())
    assert back == desc and back.layout.dtype == "int8"
    # 30 layers x (K, V) x 3 heads x 16 tokens x (64 int8 values + one bfloat16 scale)
    assert back.num_bytes == 2 * 30 * 2 * 3 * 16 * (64 + 2) == 2 * 190080


def _mutated(path: str, value) -> str:
    raw = json.loads(make_desc().to_json())
    *parents, key = path.split(".")
    target = raw
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return json.dumps(raw)


BAD_DESCRIPTORS = {
    "block id out of range": (_mutated("block_ids", [0, 1, 16]), "out of range"),
    "negative block id": (_mutated("block_ids", [0, -1, 2]), "out of range"),
    "duplicate block ids": (_mutated("block_ids", [0, 1, 1]), "duplicates"),
    "string block ids": (_mutated("block_ids", ["0", 1, 2]), "ints"),
    "wrong count for num_tokens": (_mutated("num_tokens", 20), "need 5 blocks"),
    "zero tokens": (_mutated("num_tokens", 0), "positive"),
    "bad transport": (_mutated("transport", "rdma"), "unknown transport"),
    "path traversal pool": (_mutated("pool_name", "../etc/passwd"), "does not match"),
    "another user's pool": (_mutated("pool_name", f"distserve-kv-{os.geteuid() + 1}-0123456789abcdef"),
                            "belongs to uid"),
    "short random part": (_mutated("pool_name", f"distserve-kv-{os.geteuid()}-0123"), "does not match"),
    "lease id 0": (_mutated("lease_id", 0), "lease_id"),
    "lease id 2**63": (_mutated("lease_id", 2 ** 63), "lease_id"),
    "lease id bool": (_mutated("lease_id", True), "lease_id"),
    "lease id string": (_mutated("lease_id", "5"), "lease_id"),
    "bad dtype": (_mutated("layout.dtype", "int4"), "not supported"),
    "dtype not a string": (_mutated("layout.dtype", 8), "layout.dtype must be a string"),
    "absurd num_blocks": (_mutated("layout.num_blocks", 1 << 40), "layout.num_blocks"),
    "bool head_dim": (_mutated("layout.head_dim", True), "layout.head_dim"),
    "layout key missing": (_mutated("layout.dtype", KeyError), "layout must be"),
    "key missing": (_mutated("lease_id", KeyError), "keys"),
    "unknown key": (_mutated("extra", 1), "keys"),
    "ipc handle on shm": (_mutated("ipc_mem_handle", HANDLE), "only valid"),
    "bad instance id": (_mutated("instance_id", "a/b"), "instance_id"),
    "huge input": (json.dumps({"pad": "x" * 70_000}), "bytes"),
    "too many blocks": (_mutated("block_ids", list(range(10_000))), "at most"),
    "not json": ("{not json", "not valid JSON"),
    "deeply nested": ("[" * 60_000, "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTORS))
def test_descriptor_rejects(case):
    text, message = BAD_DESCRIPTORS[case]
    with pytest.raises(InvalidDescriptor, match=message):
        KVDescriptor.from_json(text)


def test_descriptor_constructor_validates_too():
    with pytest.raises(ValueError, match="tuple of ints"):
        make_desc(block_ids=[0, 1, 2])
    with pytest.raises(InvalidDescriptor, match="ipc_mem_handle"):
        make_desc(transport="cuda_ipc")
    with pytest.raises(InvalidDescriptor, match="hex"):
        make_desc(transport="cuda_ipc", ipc_mem_handle="zz" * 64, ipc_event_handle=HANDLE)


def test_lease_ids_are_random_63_bit_and_nonzero():
    ids = {new_lease_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(0 < i < 2 ** 63 for i in ids)


