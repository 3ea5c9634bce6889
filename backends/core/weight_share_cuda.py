"""Weights shared by the instances on one GPU over CUDA IPC (see weight_share.py for the CPU
path and the directory rules): n instances on a GPU, one copy in its memory.

Lifecycle: under a per-key, per-GPU flock in the private directory, the first instance on the
GPU cudaMallocs one buffer, copies every distinct storage of its module into it (from CPU or
GPU), takes its cudaIpcGetMemHandle and writes `<key>.<gpu>.cudaipc` (0600: the handle, the
tensor index, its pid and start time). Every later instance validates the index against its
module, opens the handle (cudaIpcOpenMemHandle, once per process) and rebinds its tensors to
views of the buffer; the exporter rebinds to the buffer as well. Then each frees its private
copy (torch's caching allocator empties its cache).

Lifetime rule: the first instance (the exporter) owns the buffer and never frees it; importers
must not outlive it (in a Triton server every instance lives as long as the server). A record
whose exporter has exited is stale: the next instance to arrive exports afresh. Nothing stops a
write into the shared buffer on the GPU: share only after the last in-place change.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from backends.core.weight_share import (ALIGN, Plan, ShareInfo, WeightShareError, check_key,
                                        check_layout, locked, make_plan, named_tensors, private_dir,
                                        rebind, release_free_memory, remember, shared_info, views_of)

_OPENED: dict[tuple[str, str], int] = {}     # (key, IPC handle) -> device pointer in this process


def share_module_cuda(model: nn.Module, directory: str | Path, key: str, device_index: int = 0,
                      lock_timeout_s: float = 600.0) -> ShareInfo:
    """Back `model`'s tensors by one copy per GPU, shared by CUDA IPC.

    The first process on GPU `device_index` copies the storages (from CPU or GPU) into one
    cudaMalloc'd buffer it owns for the rest of its life and publishes the IPC handle; the
    others map that buffer. Raises CudaUnavailableError (a RuntimeError) without a GPU/driver,
    and the errors of `share_module` otherwise.
    """
    check_key(key)
    if shared_info(model) is not None:
        return shared_info(model)
    root = private_dir(directory)
    cudart = _require_cuda(device_index)
    plan = make_plan(named_tensors(model))
    path = root / f"{key}.{_device_tag(cudart, device_index)}.cudaipc"
    with locked(path.with_suffix(".lock"), lock_timeout_s):
        record = read_record(path)
        wrote = record is None or process_start(record["pid"]) != record["start"]
        if wrote:
            record = _export(cudart, plan, key, device_index)
            write_record(path, record)
        else:
            check_layout(record["index"], plan, key, path)
        ptr = _open(cudart, path, record, device_index)
    data = device_bytes(ptr, plan.num_bytes, device_index)
    rebind(plan, views_of(data, plan, [off for off, _ in record["index"]["storages"]]))
    torch.cuda.empty_cache()
    release_free_memory()
    return remember(model, ShareInfo(path, wrote, plan.num_bytes, len(plan.storages),
                                     f"cuda:{device_index}"))


def _require_cuda(device_index: int) -> Any:
    from kvtransfer.cuda_ipc import require_cuda
    from kvtransfer.errors import CudaUnavailableError
    try:
        return require_cuda(device_index)
    except CudaUnavailableError as exc:
        raise CudaUnavailableError(f"sharing weights over CUDA IPC: {exc}") from None


def _device_tag(cudart: Any, device_index: int) -> str:
    """The GPU's PCI bus id as hex digits: the same GPU whatever CUDA_VISIBLE_DEVICES says."""
    from kvtransfer.cuda_ipc import check
    bus_id = check(cudart.cudaDeviceGetPCIBusId(32, device_index), "cudaDeviceGetPCIBusId")
    text = bus_id.split(b"\0")[0].decode() if isinstance(bus_id, bytes) else str(bus_id)
    return "gpu" + re.sub(r"[^0-9a-f]", "", text.lower())


def device_bytes(ptr: int, nbytes: int, device_index: int) -> torch.Tensor:
    """`nbytes` of device memory at `ptr` as a uint8 CUDA tensor (no copy, not owned)."""
    cai = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None, "version": 3}
    return torch.as_tensor(SimpleNamespace(__cuda_array_interface__=cai), device=f"cuda:{device_index}")


def _export(cudart: Any, plan: Plan, key: str, device_index: int) -> dict[str, Any]:
    """cudaMalloc one buffer, copy the storages in, take its IPC handle; never freed here."""
    from kvtransfer.cuda_ipc import check, handle_to_hex
    check(cudart.cudaSetDevice(device_index), f"cudaSetDevice({device_index})")
    ptr = check(cudart.cudaMalloc(max(plan.num_bytes, ALIGN)), f"cudaMalloc({plan.num_bytes})")
    try:
        buf = device_bytes(ptr, plan.num_bytes, device_index)
        for off, st in zip(plan.offsets, plan.storages):
            if st.nbytes():
                src = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
                buf[off:off + st.nbytes()].copy_(src)
        torch.cuda.synchronize(device_index)
        handle = handle_to_hex(check(cudart.cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle"))
    except BaseException:
        cudart.cudaFree(ptr)            # nobody has seen it yet
        raise
    _OPENED[(key, handle)] = ptr
    return {"pid": os.getpid(), "start": process_start(os.getpid()), "handle": handle,
            "index": plan.index(key)}


def _open(cudart: Any, path: Path, record: dict[str, Any], device_index: int) -> int:
    """The device pointer of the record's buffer in this process (opened once per process)."""
    from kvtransfer.cuda_ipc import check, handle_from_hex
    slot = (record["index"]["key"], record["handle"])
    if slot not in _OPENED:
        check(cudart.cudaSetDevice(device_index), f"cudaSetDevice({device_index})")
        handle = handle_from_hex(cudart.cudaIpcMemHandle_t, record["handle"])
        _OPENED[slot] = check(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess),
                              f"cudaIpcOpenMemHandle ({path})")
    return int(_OPENED[slot])


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} is not private to us")
        try:
            return json.loads(f.read())
        except ValueError as exc:
            raise WeightShareError(f"{path} is not a CUDA IPC weights record ({exc})") from None


def write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process `pid`, None if it is gone: a pid
    and its start time name one process, even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])
