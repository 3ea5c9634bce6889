"""OPT (the DistServe paper's model family) over the paged KV cache.

Same interface as `CausalLM`: `forward(input_ids, positions, meta, kv)` runs a packed batch of
new tokens, stores their K/V and returns hidden states; `logits(hidden)` is float32. Follows
Hugging Face's OPT numerics: learned positions looked up at `position + 2`, LayerNorm before
each block (`do_layer_norm_before`, OPT-125m and >= 1.3b) or after the residual add (OPT-350m
style), q scaled by head_dim**-0.5 right after its projection, ReLU MLP, biases everywhere,
lm_head tied to the token embedding. q/k/v are packed into one matmul on load.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backends.core.attention import AttentionMetadata, paged_attention, store_kv
from backends.core.config import ModelConfig
from backends.core.kv_cache import KVPool, LayerKV
from backends.core.model import pad_rows, padded_rows

POSITION_OFFSET = 2     # OPT's embed_positions row for position p is p + 2


class OPTDecoderLayer(nn.Module):
    """Attention + ReLU MLP, each a residual block with a pre- or post-LayerNorm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        if c.num_kv_heads != c.num_heads:
            raise ValueError(f"OPT has no GQA: num_kv_heads {c.num_kv_heads} != num_heads {c.num_heads}")
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        d = c.num_heads * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, 3 * d)
        self.out_proj = nn.Linear(d, c.hidden_size)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.is_pre_norm = c.do_layer_norm_before
        self.scaling = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: LayerKV) -> torch.Tensor:
        # x: [N, D]
        x = self._residual(x, self.self_attn_layer_norm, lambda h: self._attention(h, meta, cache))
        return self._residual(x, self.final_layer_norm, lambda h: self.fc2(F.relu(self.fc1(h))))

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm,
                  block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.is_pre_norm:
            return x + block(norm(x))
        return norm(x + block(x))

    def _attention(self, h: torch.Tensor, meta: AttentionMetadata, cache: LayerKV) -> torch.Tensor:
        # h: [R, D] -> [R, D]; the first N rows are the step's tokens, the rest padding
        n = meta.positions.shape[0]
        q, k, v = self.qkv_proj(h)[:n].view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = q * self.scaling        # HF scales q after the projection and attends with scale 1
        store_kv(cache, k, v, meta)
        return self.out_proj(pad_rows(paged_attention(q, k, v, cache, meta, 1.0), h.shape[0]))


class OPTCausalLM(nn.Module):
    """OPT decoder + LM head (tied to the token embedding unless the checkpoint says otherwise)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "opt":
            raise ValueError(f"OPTCausalLM needs arch 'opt', got {config.arch!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET,
                                            config.hidden_size)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_layers))
        # HF drops the decoder's final LayerNorm in post-LN models.
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
                                 if config.do_layer_norm_before else None)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVPool) -> torch.Tensor:
        # input_ids, positions: [N] -> hidden states [N, D] (the matmuls run on padded_rows(N))
        n = input_ids.shape[0]
        pad = (0, padded_rows(n) - n)
        x = self.embed_tokens(F.pad(input_ids, pad)) + \
            self.embed_positions(F.pad(positions, pad) + POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            x = layer(x, meta, kv.layers[i])
        return x[:n] if self.final_layer_norm is None else self.final_layer_norm(x[:n])

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, D] -> [B, V] float32
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named OPT weights (`model.decoder.*`), packing q/k/v."""
        p = "model.decoder."
        embed = sd[p + "embed_tokens.weight"]
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in sd
        own: dict[str, torch.Tensor] = {
            "embed_tokens.weight": embed,
            "embed_positions.weight": sd[p + "embed_positions.weight"],
            "lm_head.weight": embed if tied else sd["lm_head.weight"],
        }
        if self.final_layer_norm is not None:
            own["final_layer_norm.weight"] = sd[p + "final_layer_norm.weight"]
            own["final_layer_norm.bias"] = sd[p + "final_layer_norm.bias"]
        for i in range(self.config.num_layers):
            own.update(_layer_weights(sd, f"{p}layers.{i}.", f"layers.{i}."))
        self.load_state_dict(own, strict=True)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


def _layer_weights(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    a = src + "self_attn."
    own = {dst + "qkv_proj." + w: torch.cat([sd[f"{a}{x}_proj.{w}"] for x in ("q", "k", "v")])
           for w in ("weight", "bias")}
    for name in ("self_attn.out_proj", "fc1", "fc2", "self_attn_layer_norm", "final_layer_norm"):
        for w in ("weight", "bias"):
            own[f"{dst}{name.removeprefix('self_attn.')}.{w}"] = sd[f"{src}{name}.{w}"]
    return own
