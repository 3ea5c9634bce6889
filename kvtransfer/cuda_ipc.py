"""CUDA IPC KV transport (GPU, same host), on cuda-python's runtime API.

Lifecycle: a prefill instance builds `CudaIpcKVExporter(layout, instance_id, device=d)`: it
probes CUDA first (no GPU or driver -> CudaUnavailableError before anything is allocated),
cudaMallocs the pool (not torch's caching allocator, whose blocks cannot be exported safely),
takes its cudaIpcGetMemHandle once, creates an interprocess event and exports its handle, and
creates a small 0600 shm segment for the lease table (the same table as the shm transport).
`.pool` wraps the device memory as torch tensors for the model -> `grant()` records the event
on torch's current stream (after prefill's KV writes) and returns a descriptor carrying both
handles -> a decode instance's `CudaIpcKVImporter(dst_pool).fetch(desc, dst_block_ids)` opens
the handles once per prefill pool (cudaIpcOpenMemHandle with lazy peer access), checks the
lease, makes its own stream wait on the event, issues one device-to-device cudaMemcpyAsync per
run of adjacent blocks, synchronizes, re-checks the lease and marks the blocks released ->
prefill `collect_released()` / `expire()` -> `close()` on both sides.

Handles cannot be opened in the process that created them: exporter and importer of one pool
must live in different processes (they do: prefill and decode instances).
"""
from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.base import LeaseBackedExporter, LeaseCheckedImporter
from kvtransfer.blockcopy import block_runs
from kvtransfer.control import check_header
from kvtransfer.descriptor import IPC_HANDLE_HEX_LEN, KVDescriptor
from kvtransfer.errors import CudaError, CudaUnavailableError
from kvtransfer.lease import DEFAULT_LEASE_TIMEOUT_S, LeaseGranter, check_exporter_args
from kvtransfer.segment import Segment
from kvtransfer.sources import SourceCache

_UNAVAILABLE = "CUDA IPC transport needs an NVIDIA GPU and driver: "
_HANDLE_NBYTES = IPC_HANDLE_HEX_LEN // 2


def _error_name(err: Any) -> str:
    return getattr(err, "name", None) or str(err)


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result `(err, *values)`: the value(s), or CudaError naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{what} failed with {_error_name(err)} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def require_cuda(device: int | None = None) -> Any:
    """The cuda-python runtime module, once a device is known to work; CudaUnavailableError if not."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception as e:  # ImportError, or a loader error from a broken install
        raise CudaUnavailableError(f"{_UNAVAILABLE}cuda-python is not importable ({e})") from None
    try:
        count = check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as e:
        raise CudaUnavailableError(_UNAVAILABLE + str(e)) from None
    except Exception as e:  # the driver library itself may be missing and raise
        raise CudaUnavailableError(
            f"{_UNAVAILABLE}cudaGetDeviceCount raised {type(e).__name__}: {e}") from None
    if count == 0:
        raise CudaUnavailableError(_UNAVAILABLE + "no CUDA device is visible")
    if device is not None and not 0 <= device < count:
        raise CudaUnavailableError(f"{_UNAVAILABLE}device {device} requested, {count} visible")
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"{_UNAVAILABLE}this torch build ({torch.__version__}) has no CUDA support")
    return cudart


def handle_to_hex(handle: Any) -> str:
    """A cudaIpcMemHandle_t / cudaIpcEventHandle_t as 128 hex characters."""
    return ctypes.string_at(handle.getPtr(), _HANDLE_NBYTES).hex()


def handle_from_hex(cls: type, text: str) -> Any:
    """A fresh handle of type `cls` holding the bytes of `text` (from handle_to_hex)."""
    raw = bytes.fromhex(text)
    if len(raw) != _HANDLE_NBYTES:
        raise ValueError(f"an IPC handle is {_HANDLE_NBYTES} bytes, got {len(raw)}")
    handle = cls()
    ctypes.memmove(handle.getPtr(), raw, _HANDLE_NBYTES)
    return handle


class _CudaArray:
    """Raw device bytes exposed to torch through __cuda_array_interface__ (v3)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


class DeviceKVPool(KVPool):
    """A KVPool over device memory we allocated ourselves (KVPool only allocates on CPU)."""

    def __init__(self, layout: KVLayout, ptr: int, device: int) -> None:
        raw = torch.as_tensor(_CudaArray(ptr, layout.nbytes), device=f"cuda:{device}")
        self._attach(layout, raw.view(layout.storage_dtype).view(layout.shape))


class _ExportedMemory:
    """cudaMalloc'd pool bytes, their IPC handle, and the interprocess 'KV written' event."""

    def __init__(self, cudart: Any, nbytes: int, device: int) -> None:
        self._cudart, self.device, self.event = cudart, device, None
        check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        self.ptr = check(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
        try:
            check(cudart.cudaMemset(self.ptr, 0, nbytes), "cudaMemset")
            mem_handle = check(cudart.cudaIpcGetMemHandle(self.ptr), "cudaIpcGetMemHandle")
            self.mem_handle = handle_to_hex(mem_handle)
            flags = cudart.cudaEventDisableTiming | cudart.cudaEventInterprocess
            self.event = check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
            event_handle = check(cudart.cudaIpcGetEventHandle(self.event), "cudaIpcGetEventHandle")
            self.event_handle = handle_to_hex(event_handle)
        except BaseException:
            self.free()
            raise

    def record(self) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        check(self._cudart.cudaEventRecord(self.event, stream), "cudaEventRecord")

    def free(self) -> None:
        cudart, event, ptr = self._cudart, self.event, self.ptr
        self.event = self.ptr = None
        if event is not None:
            check(cudart.cudaEventDestroy(event), "cudaEventDestroy")
        if ptr is not None:
            check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            check(cudart.cudaFree(ptr), "cudaFree")


def _close_exporter(pool: KVPool, segment: Segment, memory: _ExportedMemory) -> None:
    pool.release()
    segment.close()  # marks the table closed and clears owner[] before the memory goes away
    memory.free()


class CudaIpcKVExporter(LeaseBackedExporter):
    kind = "cuda_ipc"

    def __init__(self, layout: KVLayout, instance_id: str,
                 lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S, device: int = 0) -> None:
        cudart = require_cuda(device)
        check_exporter_args(instance_id, lease_timeout_s)
        self.layout, self.instance_id, self.device = layout, instance_id, device
        self._memory = _ExportedMemory(cudart, layout.nbytes, device)
        try:
            handles = (self._memory.mem_handle, self._memory.event_handle)
            self._segment = Segment.create("cuda_ipc", layout, instance_id, handles)
        except BaseException:
            self._memory.free()
            raise
        self._pool = DeviceKVPool(layout, self._memory.ptr, device)
        self._leases = LeaseGranter(self._segment.table, layout, lease_timeout_s)
        self._finalizer = weakref.finalize(self, _close_exporter, self._pool, self._segment, self._memory)

    @property
    def pool_name(self) -> str:
        return self._segment.name

    def grant(self, block_ids: Sequence[int], num_tokens: int, now: float | None = None) -> KVDescriptor:
        self._check_open()
        self._memory.record()  # decode's copy waits for every KV write issued before this grant
        lease = self._leases.grant(block_ids, num_tokens, time.monotonic() if now is None else now)
        return KVDescriptor("cuda_ipc", self.instance_id, self.pool_name, self.layout, lease.block_ids,
                            num_tokens, lease.lease_id, self._memory.mem_handle, self._memory.event_handle)


class _IpcSource:
    """A prefill pool opened in this process: its lease table, device pointer and event."""

    def __init__(self, cudart: Any, desc: KVDescriptor) -> None:
        self._cudart = cudart
        self.segment = Segment.attach(desc.pool_name, desc.transport, desc.layout)
        self.ptr = self.event = None
        try:
            check_header(self.segment.read_header(), desc)  # refuses forged handles before opening
            handle = handle_from_hex(cudart.cudaIpcMemHandle_t, desc.ipc_mem_handle)
            self.ptr = check(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess),
                             "cudaIpcOpenMemHandle")
            event = handle_from_hex(cudart.cudaIpcEventHandle_t, desc.ipc_event_handle)
            self.event = check(cudart.cudaIpcOpenEventHandle(event), "cudaIpcOpenEventHandle")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        cudart, ptr, event = self._cudart, self.ptr, self.event
        self.ptr = self.event = None
        self.segment.close()
        if event is not None:
            check(cudart.cudaEventDestroy(event), "cudaEventDestroy")
        if ptr is not None:
            check(cudart.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")


def copy_device_blocks(cudart: Any, stream: Any, src: _IpcSource, dst_ptr: int, block_nbytes: int,
                       src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """Wait for prefill's KV writes, then one D2D copy per run of adjacent blocks; blocks until done."""
    check(cudart.cudaStreamWaitEvent(stream, src.event, 0), "cudaStreamWaitEvent")
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    for s, d, n in block_runs(src_ids, dst_ids):
        check(cudart.cudaMemcpyAsync(dst_ptr + d * block_nbytes, src.ptr + s * block_nbytes,
                                     n * block_nbytes, kind, stream), "cudaMemcpyAsync")
    check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class CudaIpcKVImporter(LeaseCheckedImporter):
    kind = "cuda_ipc"

    def __init__(self, dst_pool: KVPool, max_attached: int = 64) -> None:
        self._cudart = cudart = require_cuda()
        if not dst_pool.data.is_cuda or not dst_pool.data.is_contiguous():
            raise ValueError("the cuda_ipc transport needs a contiguous CUDA destination pool")
        self.dst_pool = dst_pool
        self.device = dst_pool.data.device.index or 0
        check(cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        self._stream = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                             "cudaStreamCreateWithFlags")
        self._sources: SourceCache[_IpcSource] = SourceCache(
            self.kind, lambda desc: _IpcSource(cudart, desc), max_attached)

    def _copy(self, src: _IpcSource, desc: KVDescriptor, src_ids: tuple[int, ...],
              dst_ids: tuple[int, ...]) -> None:
        copy_device_blocks(self._cudart, self._stream, src, self.dst_pool.data.data_ptr(),
                           desc.layout.block_nbytes, src_ids, dst_ids)

    def _source(self, desc: KVDescriptor) -> _IpcSource:
        check(self._cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        return self._sources.get(desc)

    def close(self) -> None:
        with self._sources.lock:
            if self._sources.closed:
                return
            self._sources.close()
            check(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
