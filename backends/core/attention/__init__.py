"""Attention over the paged KV cache, one backend per device type.

Per step the model runner builds one `AttentionMetadata` (metadata.py: the flat varlen batch,
planned by the backend registered for the step's device, registry.py). Per layer the model
calls `store_kv(cache, k, v, meta)` then `paged_attention(q, k, v, cache, meta, scale)`, with
`cache` that layer's `LayerKV` (kv_cache.py: float or int8 KV). Registered now: the torch
backend (torch_backend.py and int8.py, CPU-tuned) for "cpu", and the same code for "cuda"
until a GPU backend (flashinfer's paged kernels) registers there: it is plain torch ops, so it
runs there (not yet run on a GPU), with a warning that its heuristics were measured on CPU.
"""
from __future__ import annotations

import torch

from backends.core.attention.metadata import AttentionMetadata
from backends.core.attention.registry import AttentionBackend, backend_for, register_backend, registered
from backends.core.attention.torch_backend import TorchAttentionBackend, decode_groups
from backends.core.kv_cache import LayerKV

__all__ = ["AttentionBackend", "AttentionMetadata", "LayerKV", "TorchAttentionBackend",
           "backend_for", "decode_groups", "paged_attention", "register_backend", "registered",
           "store_kv"]

_TORCH = TorchAttentionBackend()
register_backend("cpu", _TORCH)
register_backend("cuda", _TORCH)


def store_kv(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """k, v: [N, kvh, hd] -> their slots of `cache` (quantized if the cache is int8)."""
    meta.backend.store_kv(cache, k, v, meta)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, hd], k/v: [N, KVH, hd] (already stored in the cache). Returns [N, H * hd]."""
    return meta.backend.forward(q, k, v, cache, meta, scale)
