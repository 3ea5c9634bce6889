"""Attention over the paged KV cache, for a packed batch of variable-length sequences.

Tokens of all sequences in a step are packed along one axis (no padding): q/k/v are [N, heads,
head_dim]. Prefill sequences attend causally over their cached prefix plus their new tokens;
decode sequences contribute one new token each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_blocks: torch.Tensor      # [N] block id each new token's K/V goes to
    slot_offsets: torch.Tensor     # [N] offset inside that block
    query_lens: list[int]          # [B] new tokens per sequence
    context_lens: list[int]        # [B] cached + new tokens per sequence
    block_tables: torch.Tensor     # [B, max_blocks] padded with 0
    decode_mask: torch.Tensor | None = None   # [B, 1, 1, T] for decode: key t is valid

    @classmethod
    def build(cls, is_prefill: bool, query_lens: list[int], context_lens: list[int],
              tables: list[list[int]], block_size: int) -> AttentionMetadata:
        blocks, offsets = [], []
        for qlen, clen, table in zip(query_lens, context_lens, tables):
            for pos in range(clen - qlen, clen):
                blocks.append(table[pos // block_size])
                offsets.append(pos % block_size)
        max_blocks = max(-(-c // block_size) for c in context_lens)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        meta = cls(is_prefill, torch.tensor(blocks), torch.tensor(offsets), query_lens,
                   context_lens, torch.tensor(padded, dtype=torch.long))
        if not is_prefill:
            t = torch.arange(max_blocks * block_size)
            meta.decode_mask = (t[None, :] < torch.tensor(context_lens)[:, None])[:, None, None, :]
        return meta


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    # k_cache: [num_blocks, block_size, kvh, hd]; k: [N, kvh, hd]
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, hd], k/v: [N, KVH, hd] (already stored in the cache). Returns [N, H * hd]."""
    if meta.is_prefill:
        return _prefill_attention(q, k, v, k_cache, v_cache, meta, scale)
    return _decode_attention(q, k_cache, v_cache, meta, scale)


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, bs, kvh, hd], table: [B, nb] -> [B, kvh, length, hd]
    # (index_select is ~15x faster than advanced indexing here)
    x = cache.index_select(0, table.reshape(-1))
    x = x.view(table.shape[0], -1, *cache.shape[-2:])[:, :length]
    return x.transpose(1, 2)


def _prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    outs, start = [], 0
    for i, (qlen, clen) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qi = q[start:start + qlen].transpose(0, 1)                         # [H, q, hd]
        if qlen == clen:        # no cached prefix: attend to the new tokens directly
            ki, vi = k[start:start + qlen].transpose(0, 1), v[start:start + qlen].transpose(0, 1)
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:                   # chunk after a cached prefix: read the whole context back
            table = meta.block_tables[i:i + 1, :-(-clen // k_cache.shape[1])]
            ki, vi = _gather(k_cache, table, clen)[0], _gather(v_cache, table, clen)[0]
            mask = torch.ones(qlen, clen, dtype=torch.bool).tril(diagonal=clen - qlen)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        outs.append(o.transpose(0, 1).reshape(qlen, -1))
        start += qlen
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    # One query per sequence; the query heads sharing a KV head go in one matmul (GQA), which
    # on CPU beats SDPA's flash kernel for single-token queries.
    B, H, hd = q.shape
    T = meta.decode_mask.shape[-1]
    ks = _gather(k_cache, meta.block_tables, T)                    # [B, KVH, T, hd]
    vs = _gather(v_cache, meta.block_tables, T)
    qg = q.view(B, ks.shape[1], H // ks.shape[1], hd)              # [B, KVH, G, hd]
    scores = torch.matmul(qg, ks.transpose(-1, -2)).float() * scale  # [B, KVH, G, T]
    scores = scores.masked_fill(~meta.decode_mask, float("-inf")).softmax(-1)
    return torch.matmul(scores.to(q.dtype), vs).reshape(B, H * hd)
