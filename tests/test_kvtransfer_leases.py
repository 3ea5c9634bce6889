"""KV transfer over shared memory, the leases: a stale, forged, expired or reclaimed lease reads
nothing, grant validation, and the lease book's policy (fixtures in kvtransfer_fixtures.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kvtransfer
from kvtransfer import LeaseError, SegmentError, TransferAborted
from kvtransfer.lease import Lease, LeaseBook
from kvtransfer.shm import ShmKVExporter
from tests.kvtransfer_fixtures import (  # noqa: F401 (fixtures, the leak check autouse)
    LAYOUT, assert_blocks_equal, dst_pool, exporter, importer, shm_leak_check)


# ---- shm transport: stale or forged leases read nothing ------------------------------------

def test_wrong_lease_id_reads_nothing(exporter, importer, dst_pool):
    desc = exporter.grant([0, 1, 2], 10)
    before = dst_pool.data.clone()
    with pytest.raises(LeaseError, match="different lease"):
        importer.fetch(dataclasses.replace(desc, lease_id=desc.lease_id ^ 1), [0, 1, 2])
    with pytest.raises(LeaseError, match="not granted"):
        importer.fetch(dataclasses.replace(desc, block_ids=(0, 1, 3)), [0, 1, 2])
    assert torch.equal(dst_pool.data, before)
    assert exporter.collect_released() == []
    exporter.revoke(desc.lease_id)
    assert exporter.num_leases == 0


def test_expired_lease_reads_nothing(exporter, importer, dst_pool):
    desc = exporter.grant([0, 1, 2], 10, now=100.0)
    assert exporter.expire(now=104.9) == []
    assert exporter.expire(now=105.1) == [desc.lease_id]
    before = dst_pool.data.clone()
    with pytest.raises(LeaseError, match="expired"):
        importer.fetch(desc, [0, 1, 2])
    assert torch.equal(dst_pool.data, before)
    assert exporter.num_leases == 0


def test_block_reused_by_another_lease_reads_nothing(exporter, importer, dst_pool):
    old = exporter.grant([4, 5], 8)
    assert exporter.revoke(old.lease_id) == (4, 5)
    assert exporter.revoke(old.lease_id) == ()
    new = exporter.grant([5, 4], 8)
    before = dst_pool.data.clone()
    with pytest.raises(LeaseError, match="reclaimed and reused"):
        importer.fetch(old, [0, 1])
    assert torch.equal(dst_pool.data, before)
    importer.fetch(new, [0, 1])
    assert_blocks_equal(exporter.pool, [5, 4], dst_pool, [0, 1])
    assert exporter.collect_released() == [new.lease_id] and exporter.num_leases == 0


def test_reclaim_during_copy_is_detected(exporter, importer, monkeypatch):
    desc = exporter.grant([6, 7], 5)
    real_copy = kvtransfer.shm.copy_blocks

    def copy_then_reclaim(*args):
        real_copy(*args)
        exporter.revoke(desc.lease_id)       # prefill takes the blocks back...
        exporter.pool.data[6].fill_(0.0)     # ...and reuses them while decode still holds a copy

    monkeypatch.setattr(kvtransfer.shm, "copy_blocks", copy_then_reclaim)
    with pytest.raises(TransferAborted, match="reclaimed"):
        importer.fetch(desc, [0, 1])
    assert exporter.collect_released() == [] and exporter.num_leases == 0


def test_closed_prefill_pool_is_detected_and_unmapped(exporter, importer):
    first = exporter.grant([0], 1)
    importer.fetch(first, [0])
    second = exporter.grant([1], 1)
    assert importer.attached == [exporter.pool_name]
    exporter.close()
    with pytest.raises(SegmentError, match="does not exist"):
        importer.fetch(second, [1])
    assert importer.attached == []


def test_prune_unmaps_pools_of_closed_instances(importer):
    exporters = [ShmKVExporter(LAYOUT, f"prefill-{i}") for i in range(2)]
    for ex in exporters:
        importer.fetch(ex.grant([0], 1), [0])
    assert importer.attached == [ex.pool_name for ex in exporters]
    exporters[0].close()
    assert importer.prune() == [exporters[0].pool_name]
    assert importer.attached == [exporters[1].pool_name]
    assert exporters[1].collect_released() and exporters[1].num_leases == 0
    exporters[1].close()


# ---- grant validation --------------------------------------------------------------------

@pytest.mark.parametrize("block_ids, num_tokens, message", [
    ([0, 1], 9, "need 3 blocks"), ([0, 0], 8, "unique"), ([0, 16], 8, "unique and in"),
    ([0], 0, "positive"),
])
def test_grant_validates(exporter, block_ids, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        exporter.grant(block_ids, num_tokens)
    assert exporter.num_leases == 0


def test_grant_refuses_blocks_already_lent(exporter):
    desc = exporter.grant([0, 1], 8)
    with pytest.raises(ValueError, match="already granted"):
        exporter.grant([1, 2], 8)
    assert exporter.num_leases == 1
    exporter.revoke(desc.lease_id)
    assert exporter.num_leases == 0


# ---- lease policy -------------------------------------------------------------------------

def test_lease_book_expiry_with_fake_clock():
    book = LeaseBook(lease_timeout_s=5.0)
    book.add(Lease(1, (0,), granted_at=0.0))
    book.add(Lease(2, (1,), granted_at=3.0))
    assert book.expired(5.0) == []
    assert [lease.lease_id for lease in book.expired(5.01)] == [1]
    assert [lease.lease_id for lease in book.expired(9.0)] == [1, 2]
    with pytest.raises(ValueError, match="already outstanding"):
        book.add(Lease(1, (2,), 4.0))
    with pytest.raises(ValueError, match="lease_timeout_s"):
        LeaseBook(0)


def test_released_lease_is_collected_not_expired(exporter, importer):
    desc = exporter.grant([0, 1], 8, now=0.0)
    importer.fetch(desc, [0, 1])
    assert exporter.expire(now=1000.0) == []
    assert exporter.collect_released() == [desc.lease_id]
    assert exporter.num_leases == 0
