"""int8 KV in the torch backend: read the context back dequantized.

On CPU, torch's int8 -> bfloat16 conversion, not the matmuls, is what int8 KV costs, and a
fresh multi-MB tensor per step costs page faults on top. So a layer's context is gathered for
all KV heads at once (one index_select), converted and moved head-major in one strided copy
into a reused buffer, and the per-token scales are applied where they are cheapest: K's to
the scores [B, kvh, G, T], V's to the probabilities, instead of to every head_dim element.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from backends.core.kv_cache import LayerKV

Buffer = Callable[[int], torch.Tensor]          # numel -> a flat tensor to write into


def gather_blocks(cache: torch.Tensor, table: torch.Tensor, dtype: torch.dtype,
                  buffer: Buffer | None = None) -> torch.Tensor:
    """cache [num_blocks, kvh, bs, *rest] (values or scales), table [B, nb] ->
    [B, kvh, nb * bs, *rest] in `dtype`: one gather, one converting copy."""
    B, nb = table.shape
    x = cache.index_select(0, table.reshape(-1))                     # [B * nb, kvh, bs, *rest]
    x = x.view(B, nb, *x.shape[1:]).transpose(1, 2)                  # [B, kvh, nb, bs, *rest]
    out = torch.empty(x.shape, dtype=dtype, device=x.device) if buffer is None \
        else buffer(x.numel()).view(x.shape)
    out.copy_(x)
    return out.view(B, x.shape[1], nb * x.shape[3], *x.shape[4:])


def dequantized(cache: LayerKV, table: torch.Tensor, length: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K, V [B, kvh, length, hd] in `dtype` (values * scales: exact before the one
    rounding to `dtype`, as kv_cache.dequantize_kv)."""
    def one(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        x = gather_blocks(values, table, dtype)
        return x.mul_(gather_blocks(scales, table, dtype)[..., None])[:, :, :length]
    return one(cache.k, cache.k_scale), one(cache.v, cache.v_scale)


def decode(q: torch.Tensor, cache: LayerKV, table: torch.Tensor, valid: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q [B, H, hd] (one query per sequence), table [B, nb], valid [B, 1, 1, nb * bs] (key t
    is in the context) -> [B, H * hd]. All KV heads in one batched matmul per side."""
    B, H, hd = q.shape
    kvh = cache.k.shape[1]
    k = gather_blocks(cache.k, table, q.dtype, _SCRATCH.buffer("k", q))        # [B, kvh, T, hd]
    v = gather_blocks(cache.v, table, q.dtype, _SCRATCH.buffer("v", q))
    k_scale = gather_blocks(cache.k_scale, table, torch.float32)              # [B, kvh, T]
    v_scale = gather_blocks(cache.v_scale, table, torch.float32)
    qg = q.view(B, kvh, H // kvh, hd)                                          # [B, kvh, G, hd]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (k_scale * scale)[:, :, None]
    probs = scores.masked_fill_(~valid, float("-inf")).softmax(-1) * v_scale[:, :, None]
    return torch.matmul(probs.to(q.dtype), v).reshape(B, H * hd)


class _Scratch(threading.local):
    """Per-thread buffers reused across layers and steps (an engine steps on one thread;
    several engines in one process each get their own), grown as contexts grow."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def buffer(self, name: str, like: torch.Tensor) -> Buffer:
        key = (name, like.dtype, like.device)

        def take(numel: int) -> torch.Tensor:
            buf = self.buffers.get(key)
            # a buffer made under inference_mode cannot be written outside it (a test, or
            # a caller without the engine's inference_mode, after an engine step)
            if buf is None or buf.numel() < numel or \
                    (buf.is_inference() and not torch.is_inference_mode_enabled()):
                buf = self.buffers[key] = torch.empty(numel, dtype=key[1], device=key[2])
            return buf[:numel]
        return take


_SCRATCH = _Scratch()


def scratch(name: str, like: torch.Tensor) -> Buffer:
    """A reused per-thread buffer of `like`'s dtype and device (for `gather_blocks`)."""
    return _SCRATCH.buffer(name, like)
