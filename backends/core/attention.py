"""Attention over the paged KV cache, for a packed batch of variable-length sequences.

Tokens of all sequences in a step are packed along one axis (no padding): q/k/v are [N, heads,
head_dim]. Prefill sequences attend causally over their cached prefix plus their new tokens;
decode sequences contribute one new token each. A batch is all-prefill, all-decode, or mixed
(chunked prefill): decode rows first, then prefill chunks, each part through its own kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    num_decodes: int               # the first num_decodes sequences decode (one token each)
    slot_blocks: torch.Tensor      # [N] block id each new token's K/V goes to
    slot_offsets: torch.Tensor     # [N] offset inside that block
    query_lens: list[int]          # [B] new tokens per sequence
    context_lens: list[int]        # [B] cached + new tokens per sequence
    block_tables: torch.Tensor     # [B, max_blocks] padded with 0
    decode_mask: torch.Tensor | None = None   # [B, 1, 1, T] for decode: key t is valid
    parts: tuple[AttentionMetadata, AttentionMetadata] | None = None   # mixed: (decodes, prefills)
    # decode with very different context lengths: (row indices, their own metadata) per group
    groups: list[tuple[torch.Tensor, AttentionMetadata]] | None = None

    @property
    def is_prefill(self) -> bool:
        return self.num_decodes == 0

    @property
    def is_decode(self) -> bool:
        return self.num_decodes == len(self.query_lens)

    @classmethod
    def build(cls, num_decodes: int, query_lens: list[int], context_lens: list[int],
              tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        blocks, offsets = [], []
        for qlen, clen, table in zip(query_lens, context_lens, tables):
            for pos in range(clen - qlen, clen):
                blocks.append(table[pos // block_size])
                offsets.append(pos % block_size)
        max_blocks = max(-(-c // block_size) for c in context_lens)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        meta = cls(num_decodes, torch.tensor(blocks, device=device),
                   torch.tensor(offsets, device=device), query_lens, context_lens,
                   torch.tensor(padded, dtype=torch.long, device=device))
        if 0 < num_decodes < len(query_lens):
            # Mixed: each part gets its own tables, so decodes never gather a long prompt's width.
            d = num_decodes
            meta.parts = (cls.build(d, query_lens[:d], context_lens[:d], tables[:d], block_size, device),
                          cls.build(0, query_lens[d:], context_lens[d:], tables[d:], block_size, device))
        elif num_decodes > 1 and len(groups := decode_groups(context_lens)) > 1:
            meta.groups = [(torch.tensor(g, device=device),
                            cls.build(len(g), [1] * len(g), [context_lens[i] for i in g],
                                      [tables[i] for i in g], block_size, device)) for g in groups]
        elif num_decodes:
            t = torch.arange(max_blocks * block_size, device=device)
            lens = torch.tensor(context_lens, device=device)
            meta.decode_mask = (t[None, :] < lens[:, None])[:, None, None, :]
        return meta


GROUP_COST_TOKENS = 4096    # one more decode group costs about this many padded context tokens
# (measured on one CPU core, SmolLM2: splitting pays at batch 32 with contexts 18-886, 262 ->
# 208 ms a step, and costs at batch 8 with 40-900, 91 -> 109 ms with a 512-token cost)


def decode_groups(context_lens: list[int]) -> list[list[int]]:
    """Split a decode batch into groups of similar context length, so that each group gathers
    (and masks) only up to its own longest context: the split of the length-sorted batch that
    minimises the padded tokens plus GROUP_COST_TOKENS per group (dynamic programming)."""
    if len(context_lens) * max(context_lens) - sum(context_lens) <= GROUP_COST_TOKENS:
        return [list(range(len(context_lens)))]     # less padding than one more group costs
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    lens = [context_lens[i] for i in order]
    n = len(lens)
    best = [0.0] + [float("inf")] * n          # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                     # rows i..j-1 form the last group
            cost = best[i] + (j - i) * lens[j - 1] + GROUP_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    # k_cache: [num_blocks, kvh, block_size, hd]; k: [N, kvh, hd]
    k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, :, meta.slot_offsets] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, hd], k/v: [N, KVH, hd] (already stored in the cache). Returns [N, H * hd]."""
    if meta.is_prefill:
        return _prefill_attention(q, k, v, k_cache, v_cache, meta, scale)
    if meta.is_decode:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    decodes, prefills = meta.parts          # mixed (chunked prefill): decode rows come first
    d = meta.num_decodes
    return torch.cat([_decode_attention(q[:d], k_cache, v_cache, decodes, scale),
                      _prefill_attention(q[d:], k[d:], v[d:], k_cache, v_cache, prefills, scale)])


def _gather_head(cache: torch.Tensor, head: int, table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, kvh, bs, hd], table: [B, nb] -> one KV head's context [B, length, hd],
    # dense. (index_select is ~15x faster than advanced indexing here.)
    x = cache[:, head].index_select(0, table.reshape(-1))
    return x.view(table.shape[0], -1, cache.shape[-1])[:, :length]


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    # -> [B, kvh, length, hd]
    return torch.stack([_gather_head(cache, h, table, length) for h in range(cache.shape[1])], 1)


def _prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    # SDPA gets 4-D [1, H, S, hd] inputs: with 3-D ones it falls back to a ~3x slower path.
    outs, start = [], 0
    for i, (qlen, clen) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qi = q[start:start + qlen].transpose(0, 1)[None]                   # [1, H, q, hd]
        if qlen == clen:        # no cached prefix: attend to the new tokens directly
            ki = k[start:start + qlen].transpose(0, 1)[None]
            vi = v[start:start + qlen].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:                   # chunk after a cached prefix: read the whole context back
            table = meta.block_tables[i:i + 1, :-(-clen // k_cache.shape[2])]
            ki, vi = _gather(k_cache, table, clen), _gather(v_cache, table, clen)
            mask = torch.ones(qlen, clen, dtype=torch.bool, device=q.device).tril(diagonal=clen - qlen)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(qlen, -1))
        start += qlen
    return torch.cat(outs) if len(outs) > 1 else outs[0]


SDPA_DECODE_MAX_CONTEXT = 256     # batch-1 decode: SDPA up to here, the per-head loop beyond


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    # One query per sequence; per KV head, its G query heads go in one bmm against that head's
    # dense gathered context (GQA without repeating K/V, and no transposing copies, which on
    # CPU cost more than the matmuls; SDPA's CPU flash kernel is slower for q_len 1).
    B, H, hd = q.shape
    if meta.groups:
        out = q.new_empty(B, H * hd)
        for rows, sub in meta.groups:
            out[rows] = _decode_attention(q[rows], k_cache, v_cache, sub, scale)
        return out
    kvh = k_cache.shape[1]
    T = meta.decode_mask.shape[-1]
    if B == 1 and meta.context_lens[0] <= SDPA_DECODE_MAX_CONTEXT:
        # short context, nothing to mask: one fused SDPA call beats the per-head loop (with a
        # long context SDPA's GQA expansion costs more: 1024 tokens, ~2.8x the loop)
        T = meta.context_lens[0]
        k, v = _gather(k_cache, meta.block_tables, T), _gather(v_cache, meta.block_tables, T)
        o = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
        return o.reshape(1, H * hd)
    qg = q.view(B, kvh, H // kvh, hd)                                  # [B, KVH, G, hd]
    mask = ~meta.decode_mask[:, 0]                                     # [B, 1, T]
    outs = []
    for h in range(kvh):
        k = _gather_head(k_cache, h, meta.block_tables, T)             # [B, T, hd]
        v = _gather_head(v_cache, h, meta.block_tables, T)
        scores = torch.bmm(qg[:, h], k.transpose(1, 2)).float() * scale  # [B, G, T]
        probs = scores.masked_fill_(mask, float("-inf")).softmax(-1).to(q.dtype)
        outs.append(torch.bmm(probs, v))                               # [B, G, hd]
    return torch.stack(outs, 1).reshape(B, H * hd)
