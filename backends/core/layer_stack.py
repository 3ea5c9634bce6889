"""A decode step's layer stack in one native call (csrc/layer_stack.cpp, `decode_layers`).

A Llama-family step of a few rows is a few hundred small ops; on one CPU core, calling them from
Python cost about 8 of a batch-1 step's 22 ms (SmolLM2, docs/profile_step.md). Where every
piece runs on our native kernels anyway (int4 weights on `quant_linear`, bf16 KV read by the
paged kernels), the same ops run from C++ in the same order, so the results are bit-identical
to `DecoderLayer.forward`, which still serves everything else: prefills and chunks, steps of
more than 64 rows, mixed steps, float32, other devices. int8 KV runs here where its attention
op is built (csrc/chunk_attention.cpp with AVX-512 BF16, chunk_attention_avx2.cpp with AVX2):
the rows' K/V quantized as kv_cache.quantize_kv does it, bit for bit.

DISTSERVE_LAYER_STACK=0 turns it off (for comparisons).
"""
from __future__ import annotations

import os

import torch

from backends.core.attention.metadata import AttentionMetadata
from backends.core.attention.torch_backend import TorchAttentionBackend
from backends.core.kv_cache import KVPool
from backends.core.quant import NATIVE_INT4_MAX_ROWS, Int4Linear

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
MAX_ROWS = 64        # rows padded_rows() leaves unpadded (the stack never pads)


def enabled() -> bool:
    return os.environ.get("DISTSERVE_LAYER_STACK", "1") != "0"


class LayerStack:
    """The model's per-layer tensors for `decode_layers`, and when a step may use it."""

    def __init__(self, layers, int8: bool = False) -> None:
        """`int8`: int8 KV runs here too (its attention op is built)."""
        self.layers = list(layers)
        self.int8 = int8
        first = self.layers[0]
        self.heads, self.kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.scale, self.eps = first.scale, first.input_layernorm.eps
        self._weights: list[torch.Tensor] | None = None
        self._key: tuple | None = None

    @classmethod
    def build(cls, layers) -> LayerStack | None:
        """None unless every projection runs on the native int4 kernel and the op is built."""
        from backends.core import native
        if not (enabled() and native.has("decode_layers") and native.has("quant_linear")):
            return None
        for layer in layers:
            for name in LINEARS:
                mod = getattr(layer, name)
                if not (isinstance(mod, Int4Linear) and mod.native) or (name != "qkv_proj" and mod.bias is not None):
                    return None
        return cls(layers, native.has("paged_attention_int8"))

    def _refresh(self) -> None:
        """The op's tensors, gathered again whenever the layers' buffers were rebound (weight
        sharing maps them onto a shared file; a kept reference would pin the private copy)."""
        first, last = self.layers[0].qkv_proj, self.layers[-1].down_proj
        key = (id(first.native_codes), id(last.native_codes), id(first.dense), id(first.dense_packed),
               id(last.dense), id(last.dense_packed))
        if key == self._key:
            return
        empty = torch.empty(0)
        weights, dense = [], False
        for layer in self.layers:
            mods = [getattr(layer, name) for name in LINEARS]
            qkv, o, gu, down = mods
            weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                        qkv.native_codes, qkv.native_so, empty if qkv.bias is None else qkv.bias,
                        o.native_codes, o.native_so, gu.native_codes, gu.native_so,
                        down.native_codes, down.native_so]
            dense = dense or any(m.dense is not None or m.dense_packed is not None for m in mods)
        self._weights, self._key = weights, key
        # past NATIVE_INT4_MAX_ROWS a layer holding a dense copy runs that (Int4Linear.forward)
        self.max_rows = min(MAX_ROWS, NATIVE_INT4_MAX_ROWS) if dense else MAX_ROWS

    def query_lens(self, x: torch.Tensor, meta: AttentionMetadata, kv: KVPool) -> tuple[bool, torch.Tensor | None]:
        """(whether this step can run here, each sequence's new tokens for the prefix kernel or
        None for one token each). A mixed step of short rows (decodes beside speculative verify
        rows): the verify sequences' new tokens; `run` decodes the first num_decodes."""
        n = x.shape[0]
        backend = meta.backend
        self._refresh()
        if not (n <= self.max_rows and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and isinstance(backend, TorchAttentionBackend) and backend.native):
            return False, None
        cache = kv.layers[0]
        if cache.is_quantized:
            if not (self.int8 and self.head_dim in (64, 128)):
                return False, None
        elif cache.k.dtype != x.dtype:
            return False, None
        if meta.is_decode:
            return True, None
        if not (self.head_dim in (64, 128) and self.heads // self.kv_heads <= 8):
            return False, None
        parts = getattr(meta.plan, "parts", None)
        plan = meta.plan if meta.is_prefill else parts[1].plan if parts else None
        short = getattr(plan, "short_rows", None)
        return (True, short) if short is not None else (False, None)

    def run(self, x, cos, signed_sin, meta: AttentionMetadata, kv: KVPool, query_lens):
        """(x, delta) after the last layer, as the Python loop returns them."""
        plan = meta.plan
        if self._weights is None:       # else query_lens() refreshed them this step
            self._refresh()
        layers = kv.layers
        scales = ([c.k_scale for c in layers], [c.v_scale for c in layers]) if layers[0].is_quantized else ([], [])
        return torch.ops.distserve.decode_layers(
            x, self._weights, cos, signed_sin, [c.k for c in layers], [c.v for c in layers],
            meta.block_tables, meta.seq_lens, plan.slot_blocks, plan.slot_offsets, query_lens,
            self.heads, self.kv_heads, self.eps, self.scale,
            meta.num_decodes if query_lens is not None else 0, *scales)
