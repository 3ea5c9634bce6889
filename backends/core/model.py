"""Decoder-only transformers (Llama / Mistral / Qwen2, and OPT) over the paged KV cache.

One forward serves both phases: `forward(input_ids, positions, meta, kv)` runs a packed batch of
new tokens (a prefill chunk per sequence, or one token per sequence in decode), writes their
K/V into the pool and returns hidden states. Weights arrive with Hugging Face names and are
packed on load (q/k/v into one matmul, gate/up into one) to cut per-layer op count.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backends.core.attention import AttentionMetadata, paged_attention, store_kv
from backends.core.config import ModelConfig
from backends.core.kv_cache import KVPool, LayerKV
from backends.core.layer_stack import LayerStack


def rope_cos_sin(config: ModelConfig, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_pos, head_dim] in float32 (HF's rotate_half layout)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs is not None and rs.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rs)
    t = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _llama3_inv_freq(inv_freq: torch.Tensor, rs) -> torch.Tensor:
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def padded_rows(n: int) -> int:
    """The rows a packed batch of `n` new tokens runs its matmuls on: `n` up to 64, above that
    `n` rounded up to a sixteenth of its power of two (at most 6.25% padding). On CPU, oneDNN
    builds a GEMM primitive for each distinct row count and caches up to 1024 of them
    (ONEDNN_PRIMITIVE_CACHE_CAPACITY), each with its own scratch memory: with prompts of every
    length an engine built new primitives at nearly every prefill step (tens of ms) and its
    memory grew by gigabytes before the cache's bound. Bucketed, about a hundred row counts
    cover every batch up to 4096 tokens. Padding rows run the matmuls only: attention, the KV
    cache and the output see the `n` real rows."""
    if n <= 64:
        return n
    step = 1 << (n.bit_length() - 5)
    return -(-n // step) * step


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [n, ...] with zero rows appended up to `rows`."""
    return x if x.shape[0] == rows else F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


_FUSED: bool | None = None


def fused(x: torch.Tensor) -> bool:
    """Our fused CPU kernels (backends/core/csrc/fused.cpp) for `x`: built, not turned off
    (DISTSERVE_NATIVE=0), a CPU tensor in float32 or bfloat16. Else the torch ops below."""
    global _FUSED
    if _FUSED is None:
        from backends.core import native
        _FUSED = native.enabled() and native.available()
    return _FUSED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, hd]; cos/signed_sin: [N, 1, hd] in x's dtype, signed_sin = [-sin_1, sin_2]:
    # HF's x*cos + rotate_half(x)*sin, with rotate_half(x) = [-x2, x1] = roll(x) * [-1, 1]
    if fused(x) and x.stride(-1) == 1 and cos.dtype == x.dtype:
        return torch.ops.distserve.rope(x, cos[:, 0], signed_sin[:, 0])
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate, up) -> silu(gate) * up, [N, I]."""
    if fused(x) and x.stride(-1) == 1:
        return torch.ops.distserve.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)): the residual stream and its normed rows, in one pass."""
    if fused(x) and norm.weight.dtype == x.dtype == delta.dtype and x.stride(-1) == delta.stride(-1) == 1:
        return torch.ops.distserve.add_rms_norm(x, delta, norm.weight, norm.eps)
    x = x + delta
    return x, norm(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op (float32 inside), 4x faster than the spelled-out HF form at 512 rows
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """Llama-family layer: pre-norm attention with RoPE + gated SiLU MLP."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, q + 2 * kv, bias=c.qkv_bias)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.scale = c.head_dim ** -0.5

    def forward(self, x, delta, cos, sin, meta: AttentionMetadata, cache: LayerKV):
        # x: [R, D] the residual stream, the N = len(cos) real tokens' rows first, then padding
        # (padded_rows); delta: the previous layer's MLP output, still to be added (None first).
        # Returns (x, this layer's MLP output): each add is fused with the norm that follows it.
        n, h, kvh, hd = cos.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if delta is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = add_rms_norm(x, delta, self.input_layernorm)
        qkv = self.qkv_proj(normed)[:n]
        qk = apply_rope(qkv[:, :(h + kvh) * hd].view(n, h + kvh, hd), cos, sin)  # q and k at once
        q, k = qk.split([h, kvh], dim=1)
        v = qkv[:, (h + kvh) * hd:].view(n, kvh, hd)
        store_kv(cache, k, v, meta)
        attn = self.o_proj(pad_rows(paged_attention(q, k, v, cache, meta, self.scale), x.shape[0]))
        x, normed = add_rms_norm(x, attn, self.post_attention_layernorm)
        return x, self.down_proj(silu_and_mul(self.gate_up_proj(normed)))


class CausalLM(nn.Module):
    """Llama / Mistral / Qwen2."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_cos_sin(config, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVPool) -> torch.Tensor:
        # input_ids, positions: [N] -> hidden states [N, D]
        n = input_ids.shape[0]
        x = self.embed_tokens(F.pad(input_ids, (0, padded_rows(n) - n)))        # [R, D]
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)               # [N, 1, hd]
        half = self.config.head_dim // 2
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)            # signed, once a step
        stack = self._layer_stack()
        ok, query_lens = stack.query_lens(x, meta, kv) if stack is not None else (False, None)
        if ok:                      # a decode step on our kernels: the layers in one native call
            x, delta = stack.run(x, cos[:, 0], sin[:, 0], meta, kv, query_lens)
        else:
            delta = None
            for i, layer in enumerate(self.layers):
                x, delta = layer(x, delta, cos, sin, meta, kv.layers[i])
        return add_rms_norm(x[:n], delta[:n], self.norm)[1]

    def _layer_stack(self) -> LayerStack | None:
        # decided on the first step, once the weights are in their final format
        if not hasattr(self, "_stack"):
            self._stack = LayerStack.build(self.layers)
        return self._stack

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def linear_sources(self) -> dict[str, list[str]]:
        """Each linear layer's Hugging Face weights, in the order they are packed."""
        out = {"lm_head": ["model.embed_tokens.weight" if self.config.tie_word_embeddings
                           else "lm_head.weight"]}
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            out[f"layers.{i}.qkv_proj"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            out[f"layers.{i}.o_proj"] = [p + "self_attn.o_proj.weight"]
            out[f"layers.{i}.gate_up_proj"] = [p + f"mlp.{x}_proj.weight" for x in ("gate", "up")]
            out[f"layers.{i}.down_proj"] = [p + "mlp.down_proj.weight"]
        return out

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights, packing q/k/v and gate/up."""
        own: dict[str, torch.Tensor] = {
            "embed_tokens.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"],
            "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
            if not self.config.tie_word_embeddings else sd["model.embed_tokens.weight"],
        }
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            own[f"layers.{i}.qkv_proj.weight"] = torch.cat(
                [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
            if self.config.qkv_bias:
                own[f"layers.{i}.qkv_proj.bias"] = torch.cat(
                    [sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]])
            own[f"layers.{i}.o_proj.weight"] = sd[a + "o_proj.weight"]
            own[f"layers.{i}.gate_up_proj.weight"] = torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            own[f"layers.{i}.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
            own[f"layers.{i}.input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            own[f"layers.{i}.post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        self.load_state_dict(own, strict=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
