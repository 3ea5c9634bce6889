"""KV transfer over shared memory: segment security and cleanup, fetch in-process and across a
real process boundary, destination checks, the registry and block runs (the lease tests are in
test_kvtransfer_leases.py; fixtures in kvtransfer_fixtures.py)."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import multiprocessing as mp
import os
import stat
import struct

import pytest
import torch

import kvtransfer
from backends.core.kv_cache import KVPool
from kvtransfer import KVDescriptor, SegmentError, make_exporter, make_importer
from kvtransfer.blockcopy import block_bytes, block_runs
from kvtransfer.control import SegmentHeader
from kvtransfer.descriptor import POOL_NAME_RE, make_pool_name
from kvtransfer.segment import SHM_DIR, reap_stale_segments
from kvtransfer.shm import ShmKVExporter, ShmKVImporter
from tests.kvtransfer_fixtures import (  # noqa: F401 (fixtures, the leak check autouse)
    DST_LAYOUT, LAYOUT, assert_blocks_equal, dst_pool, exporter, importer, shm_leak_check)

HANDLE = "ab" * 64


# ---- segment ------------------------------------------------------------------------------

def test_segment_is_0600_ours_and_unguessable():
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        ex = ShmKVExporter(LAYOUT, "prefill-0")
    finally:
        os.umask(old_umask)
    st = os.stat(os.path.join(SHM_DIR, ex.pool_name))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    match = POOL_NAME_RE.match(ex.pool_name)
    assert match and int(match.group(1)) == os.geteuid()
    assert len(match.group(2)) * 4 >= 64  # hex digits from secrets.token_hex(8)
    names = {make_pool_name() for _ in range(2000)}
    assert len(names) == 2000
    ex.close()


def test_close_unlinks_is_idempotent_and_runs_on_gc():
    ex = ShmKVExporter(LAYOUT, "prefill-0")
    path = os.path.join(SHM_DIR, ex.pool_name)
    assert os.path.exists(path)
    ex.close()
    ex.close()
    assert not os.path.exists(path)
    with pytest.raises(RuntimeError, match="closed"):
        ex.grant([0], 1)
    imp = ShmKVImporter(KVPool(DST_LAYOUT))
    imp.close()
    imp.close()
    with pytest.raises(RuntimeError, match="closed"):
        imp.release(KVDescriptor("shm", "prefill-0", ex.pool_name, LAYOUT, (0,), 1, 1))
    ex2 = ShmKVExporter(LAYOUT, "prefill-0")
    path2 = os.path.join(SHM_DIR, ex2.pool_name)
    del ex2
    gc.collect()
    assert not os.path.exists(path2)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_does_not_unlink_parents_segment(exporter):
    pid = os.fork()
    if pid == 0:  # child: closing its inherited copy must leave the parent's segment alone
        exporter.close()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(os.path.join(SHM_DIR, exporter.pool_name))
    exporter.revoke(exporter.grant([0], 1).lease_id)
    assert exporter.num_leases == 0


def test_header_round_trip_and_rejects_foreign_data():
    header = SegmentHeader("cuda_ipc", LAYOUT, "prefill-0", 123, 0, 0, 1, HANDLE, "cd" * 64)
    assert SegmentHeader.unpack(header.pack().ljust(512, b"\0")) == header
    with pytest.raises(SegmentError, match="magic"):
        SegmentHeader.unpack(b"X" * 512)
    bumped = bytearray(header.pack().ljust(512, b"\0"))
    struct.pack_into("<I", bumped, 8, 99)
    with pytest.raises(SegmentError, match="version 99"):
        SegmentHeader.unpack(bytes(bumped))


def test_attach_refuses_wrong_mode_and_owner(exporter, importer):
    desc = exporter.grant([0, 1, 2], 10)
    path = os.path.join(SHM_DIR, exporter.pool_name)
    os.chmod(path, 0o644)
    with pytest.raises(SegmentError, match="mode 0o644"):
        importer.fetch(desc, [0, 1, 2])
    os.chmod(path, 0o600)
    if os.geteuid() == 0:  # only root can give the file away
        os.chown(path, 12345, -1)
        with pytest.raises(SegmentError, match="owned by uid 12345"):
            importer.fetch(desc, [0, 1, 2])
        os.chown(path, 0, -1)
    importer.fetch(desc, [0, 1, 2])
    assert exporter.collect_released() == [desc.lease_id]


def test_forged_layout_is_refused_before_reading(exporter, importer, dst_pool):
    desc = exporter.grant([0, 1, 2], 10)
    before = dst_pool.data.clone()
    forged = dataclasses.replace(desc, layout=dataclasses.replace(LAYOUT, num_blocks=1000),
                                 block_ids=(500, 1, 2))
    with pytest.raises(SegmentError, match="bytes"):
        importer.fetch(forged, [0, 1, 2])
    with pytest.raises(SegmentError, match="instance"):
        importer.fetch(dataclasses.replace(desc, instance_id="prefill-1"), [0, 1, 2])
    assert torch.equal(dst_pool.data, before)
    exporter.revoke(desc.lease_id)
    assert exporter.num_leases == 0


def test_reap_stale_segments_removes_dead_creators(exporter):
    proc = mp.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    path = os.path.join(SHM_DIR, exporter.pool_name)
    with open(path, "r+b") as f:  # pretend the dead process created it
        f.seek(24)
        f.write(struct.pack("<Q", proc.pid))
    assert exporter.pool_name in reap_stale_segments()
    assert not os.path.exists(path)


# ---- shm transport: success paths ---------------------------------------------------------

def test_fetch_copies_blocks_and_releases_lease(exporter, importer, dst_pool):
    desc = exporter.grant([3, 4, 5, 9], 14)
    untouched = [i for i in range(DST_LAYOUT.num_blocks) if i not in (0, 7, 8, 2)]
    before = dst_pool.data[untouched].clone()
    stats = importer.fetch(KVDescriptor.from_json(desc.to_json()), [0, 7, 8, 2])
    assert stats.num_bytes == 4 * LAYOUT.block_nbytes and stats.seconds > 0
    assert_blocks_equal(exporter.pool, [3, 4, 5, 9], dst_pool, [0, 7, 8, 2])
    assert torch.equal(dst_pool.data[untouched], before)
    assert exporter.num_leases == 1
    assert exporter.collect_released() == [desc.lease_id]
    assert exporter.collect_released() == [] and exporter.num_leases == 0


def test_release_without_copy_frees_the_lease(exporter, importer, dst_pool):
    desc = exporter.grant([0], 3)
    before = dst_pool.data.clone()
    importer.release(desc)
    assert torch.equal(dst_pool.data, before)
    assert exporter.collect_released() == [desc.lease_id] and exporter.num_leases == 0


def _decode_child(desc_json: str, dst_ids: list[int], conn) -> None:
    pool = KVPool(DST_LAYOUT)
    with make_importer("shm", pool) as imp:
        stats = imp.fetch(KVDescriptor.from_json(desc_json), dst_ids)
        digest = hashlib.sha256(block_bytes(pool.data)[dst_ids].tobytes()).hexdigest()
    conn.send((digest, stats.num_bytes))


def test_two_process_fetch(exporter):
    desc = exporter.grant([2, 3, 11, 12, 13], 17)
    expected = hashlib.sha256(block_bytes(exporter.pool.data)[list(desc.block_ids)].tobytes()).hexdigest()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_child, args=(desc.to_json(), [11, 0, 5, 6, 1], child))
    proc.start()
    child.close()  # the child holds its end now; a crash shows up as EOF
    assert parent.poll(60), "decode child did not answer"
    digest, num_bytes = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert digest == expected and num_bytes == 5 * LAYOUT.block_nbytes
    assert exporter.collect_released() == [desc.lease_id]
    assert os.path.exists(os.path.join(SHM_DIR, exporter.pool_name))  # no tracker unlinked it
    assert exporter.num_leases == 0


# ---- destination checks ------------------------------------------------------------------

def test_destination_must_match(exporter, importer, dst_pool):
    desc = exporter.grant([0, 1], 8)
    before = dst_pool.data.clone()
    other_model = ShmKVImporter(KVPool(dataclasses.replace(DST_LAYOUT, head_dim=16)))
    with pytest.raises(ValueError, match="block-compatible"):
        other_model.fetch(desc, [0, 1])
    for dst_ids, message in (([0], "destination"), ([0, 0], "duplicates"), ([0, 12], r"\[0, 12\)")):
        with pytest.raises(ValueError, match=message):
            importer.fetch(desc, dst_ids)
    assert torch.equal(dst_pool.data, before)
    assert other_model.attached == [] and importer.attached == []
    exporter.revoke(desc.lease_id)



def test_int8_pool_moves_values_and_scales_in_one_copy_per_block():
    layout = dataclasses.replace(LAYOUT, dtype="int8")
    with ShmKVExporter(layout, "prefill-0") as ex:
        torch.manual_seed(0)
        ex.pool.data.copy_(torch.randint(0, 256, layout.shape, dtype=torch.uint8))
        dst = KVPool(dataclasses.replace(layout, num_blocks=12))
        with ShmKVImporter(dst) as imp:
            desc = KVDescriptor.from_json(ex.grant([5, 2], 7).to_json())
            stats = imp.fetch(desc, [0, 9])
            assert stats.num_bytes == 2 * layout.block_nbytes
            for s, d in ((5, 0), (2, 9)):
                for src_layer, dst_layer in zip(ex.pool.layers, dst.layers):
                    for name in ("k", "v", "k_scale", "v_scale"):
                        assert torch.equal(getattr(src_layer, name)[s], getattr(dst_layer, name)[d])
            assert ex.collect_released() == [desc.lease_id] and ex.num_leases == 0


@pytest.mark.parametrize("src, dst", [("int8", "bfloat16"), ("bfloat16", "int8"), ("float32", "int8")])
def test_kv_dtype_mismatch_names_both_dtypes_and_reads_nothing(src, dst):
    with ShmKVExporter(dataclasses.replace(LAYOUT, dtype=src), "prefill-0") as ex:
        pool = KVPool(dataclasses.replace(DST_LAYOUT, dtype=dst))
        before = pool.data.clone()
        with ShmKVImporter(pool) as imp:
            desc = ex.grant([0, 1], 8)
            with pytest.raises(ValueError, match=f"KV dtype mismatch.*holds {src} KV.*holds {dst}"):
                imp.fetch(desc, [0, 1])
            assert torch.equal(pool.data, before) and imp.attached == []
            imp.release(desc)
            assert ex.collect_released() == [desc.lease_id] and ex.num_leases == 0


# ---- registry and block runs --------------------------------------------------------------

def test_registry():
    with make_exporter("shm", LAYOUT, "prefill-0", lease_timeout_s=1.0) as ex:
        assert isinstance(ex, kvtransfer.KVExporter) and ex.kind == "shm"
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'; valid: cuda_ipc, shm"):
        make_exporter("rdma", LAYOUT, "prefill-0")
    with pytest.raises(ValueError, match="valid: cuda_ipc, shm"):
        make_importer("nccl", KVPool(LAYOUT))
    assert set(kvtransfer._REGISTRY) == set(kvtransfer.TRANSPORTS)


def test_block_runs():
    assert block_runs([3, 4, 5, 9], [0, 1, 2, 3]) == [(3, 0, 3), (9, 3, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert block_runs([], []) == []
