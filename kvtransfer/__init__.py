"""Moving KV blocks from prefill instances to decode instances on the same host.

    exporter = make_exporter("shm", layout, "prefill-0")      # prefill: model writes exporter.pool
    desc = exporter.grant(block_ids, num_tokens)              # -> desc.to_json() through Triton
    importer = make_importer("shm", decode_pool)              # decode
    importer.fetch(KVDescriptor.from_json(text), dst_block_ids)
    exporter.collect_released()                               # prefill: free those leases' blocks

Transports: "shm" (POSIX shared memory, CPU) and "cuda_ipc" (CUDA IPC, GPU; needs a device).
"""
from __future__ import annotations

import importlib
from typing import Any

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.base import KVExporter, KVImporter, TransferStats
from kvtransfer.descriptor import TRANSPORTS, KVDescriptor
from kvtransfer.errors import (CudaError, CudaUnavailableError, InvalidDescriptor, KVTransferError,
                               LeaseError, SegmentError, TransferAborted)

# kind -> (module, exporter class, importer class); modules load on first use, so the CPU path
# never imports cuda-python.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "shm": ("kvtransfer.shm", "ShmKVExporter", "ShmKVImporter"),
    "cuda_ipc": ("kvtransfer.cuda_ipc", "CudaIpcKVExporter", "CudaIpcKVImporter"),
}


def _load(kind: str, role: int) -> Any:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown KV transport {kind!r}; valid: {', '.join(sorted(_REGISTRY))}")
    module = importlib.import_module(_REGISTRY[kind][0])
    return getattr(module, _REGISTRY[kind][role])


def make_exporter(kind: str, layout: KVLayout, instance_id: str, **options: Any) -> KVExporter:
    """A prefill-side exporter. Options: lease_timeout_s; for cuda_ipc also device."""
    return _load(kind, 1)(layout, instance_id, **options)


def make_importer(kind: str, dst_pool: KVPool, **options: Any) -> KVImporter:
    """A decode-side importer copying into `dst_pool`. Options: max_attached."""
    return _load(kind, 2)(dst_pool, **options)


__all__ = ["KVExporter", "KVImporter", "KVDescriptor", "TransferStats", "make_exporter",
           "make_importer", "InvalidDescriptor", "KVTransferError", "SegmentError", "LeaseError",
           "TransferAborted", "CudaError", "CudaUnavailableError", "TRANSPORTS"]
