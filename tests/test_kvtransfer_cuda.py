"""CUDA IPC transport: what can be tested without a device (the clear error on construction,
error-code checking, IPC handle serialization), plus a real two-process test marked `gpu`."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp

import pytest
import torch

import kvtransfer
from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer import CudaUnavailableError, KVDescriptor, make_exporter, make_importer
from kvtransfer.segment import list_segments

LAYOUT = KVLayout(num_blocks=16, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8)
DST_LAYOUT = dataclasses.replace(LAYOUT, num_blocks=12)


def _cuda_device_count() -> int:
    try:
        from cuda.bindings import runtime as cudart
        err, count = cudart.cudaGetDeviceCount()
        return count if int(err) == 0 and torch.cuda.is_available() else 0
    except Exception:
        return 0


HAS_GPU = _cuda_device_count() > 0


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path")
def test_cuda_ipc_without_gpu_fails_clearly_at_construction():
    message = (r"^CUDA IPC transport needs an NVIDIA GPU and driver: "
               r"cudaGetDeviceCount (failed with \w+ \(\d+\)|raised)")
    before = list_segments()
    with pytest.raises(CudaUnavailableError, match=message):
        make_exporter("cuda_ipc", LAYOUT, "prefill-0")
    with pytest.raises(CudaUnavailableError, match=message):
        make_importer("cuda_ipc", KVPool(LAYOUT))
    assert issubclass(CudaUnavailableError, RuntimeError)
    assert set(list_segments()) <= set(before)  # failed before creating anything


def test_cuda_check_and_driver_raising(monkeypatch):
    from cuda.bindings import runtime as cudart

    from kvtransfer.cuda_ipc import check, require_cuda
    assert check((cudart.cudaError_t.cudaSuccess, 5), "cudaFoo") == 5
    assert check((cudart.cudaError_t.cudaSuccess,), "cudaFoo") is None
    with pytest.raises(kvtransfer.CudaError, match=r"cudaFoo failed with cudaErrorInsufficientDriver \(35\)"):
        check((cudart.cudaError_t.cudaErrorInsufficientDriver,), "cudaFoo")

    def driver_missing():
        raise RuntimeError("libcuda.so.1: cannot open shared object file")
    monkeypatch.setattr(cudart, "cudaGetDeviceCount", driver_missing)
    with pytest.raises(CudaUnavailableError, match="needs an NVIDIA GPU and driver: .*raised RuntimeError"):
        require_cuda()


def test_ipc_handle_hex_round_trip():
    from cuda.bindings import runtime as cudart

    from kvtransfer.cuda_ipc import handle_from_hex, handle_to_hex
    text = bytes(range(64)).hex()
    for cls in (cudart.cudaIpcMemHandle_t, cudart.cudaIpcEventHandle_t):
        assert handle_to_hex(handle_from_hex(cls, text)) == text
    with pytest.raises(ValueError, match="64 bytes"):
        handle_from_hex(cudart.cudaIpcMemHandle_t, "ab" * 10)


def _gpu_decode_child(desc_json: str, conn) -> None:
    pool = KVPool(DST_LAYOUT)
    pool.data = pool.data.cuda()  # a device pool for the importer
    with make_importer("cuda_ipc", pool) as imp:
        imp.fetch(KVDescriptor.from_json(desc_json), [3, 4])
        conn.send(pool.data[[3, 4]].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_ipc_two_process_fetch():
    with make_exporter("cuda_ipc", LAYOUT, "prefill-0") as ex:
        ex.pool.data.normal_()
        desc = ex.grant([1, 2], 5)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_gpu_decode_child, args=(desc.to_json(), child))
        proc.start()
        child.close()
        assert parent.poll(120)
        got = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0
        assert torch.equal(got, ex.pool.data[[1, 2]].cpu())
        assert ex.collect_released() == [desc.lease_id] and ex.num_leases == 0
