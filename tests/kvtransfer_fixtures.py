"""Shared by the shm KV-transfer tests (test_kvtransfer.py, test_kvtransfer_leases.py): the
layouts, the autouse check that a test leaves no shared-memory segment of ours behind, the
exporter / importer / destination-pool fixtures and a block comparison."""
from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.segment import SHM_DIR, list_segments, segment_creator_pid
from kvtransfer.shm import ShmKVExporter, ShmKVImporter

LAYOUT = KVLayout(num_blocks=16, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8)
DST_LAYOUT = dataclasses.replace(LAYOUT, num_blocks=12)


def _our_segments() -> set[str]:
    return {n for n in list_segments() if segment_creator_pid(n) == os.getpid()}


@pytest.fixture(autouse=True)
def shm_leak_check():
    before = _our_segments()
    yield
    gc.collect()
    leaked = _our_segments() - before
    for name in leaked:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not leaked, f"test left shared-memory segments behind: {leaked}"


@pytest.fixture
def exporter():
    ex = ShmKVExporter(LAYOUT, "prefill-0", lease_timeout_s=5.0)
    torch.manual_seed(0)
    ex.pool.data.normal_()
    yield ex
    ex.close()
    assert not os.path.exists(os.path.join(SHM_DIR, ex.pool_name))


@pytest.fixture
def dst_pool() -> KVPool:
    pool = KVPool(DST_LAYOUT)
    pool.data.fill_(7.0)
    return pool


@pytest.fixture
def importer(dst_pool):
    imp = ShmKVImporter(dst_pool)
    yield imp
    imp.close()
    assert imp.attached == []


def assert_blocks_equal(src: KVPool, src_ids, dst: KVPool, dst_ids) -> None:
    assert torch.equal(src.data[list(src_ids)], dst.data[list(dst_ids)])
