"""The torch attention backend: plain torch ops, tuned on CPU cores.

A batch is all-prefill, all-decode, or mixed (chunked prefill): decode rows first, then prefill
chunks, each part through its own path. Prefill runs SDPA per sequence (over the fresh k/v
when there is no cached prefix, else over the context read back from the cache). Decode on CPU
runs our kernel where it is built (backends/core/native.py, csrc/paged_decode.cpp: each sequence read
straight from its blocks, to its own length). Otherwise, and for int8 KV, decode runs,
per KV head, one bmm of its G query heads against that head's dense gathered context; batch 1
with a short context takes one SDPA call instead, and a batch of very different context
lengths is split into length groups. int8 KV is quantized on store. On CPU hosts with the chunk
kernel (bf16 queries; AVX-512 BF16 or AVX2) every row reads it there, straight from the cache
(`paged_attention_int8`: csrc/chunk_attention.cpp applies K scales to the scores and V scales to
the probabilities, csrc/chunk_attention_avx2.cpp dequantizes K/V as it widens them).
Elsewhere (int8.py) it is dequantized on read: into dense K/V for SDPA, and folded into the
scores and the probabilities in a decode that takes all KV heads in one batched matmul (the
int8 -> bf16 conversion is a copy anyway, so the head-major layout it writes costs nothing
extra).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.core.attention import int8
from backends.core.attention.metadata import AttentionMetadata
from backends.core.attention.registry import AttentionBackend
from backends.core.kv_cache import LayerKV, quantize_kv

GROUP_COST_TOKENS = 4096    # one more decode group costs about this many padded context tokens
# (measured on one CPU core, SmolLM2: splitting pays at batch 32 with contexts 18-886, 262 ->
# 208 ms a step, and costs at batch 8 with 40-900, 91 -> 109 ms with a 512-token cost)
SDPA_DECODE_MAX_CONTEXT = 256     # batch-1 decode: SDPA up to here, the per-head loop beyond
NATIVE_MAX_QUERY = 8        # prefill rows of up to this many new tokens (speculative verify rows,
# short chunks) run the native prefix kernel: K/V read once per row for all its tokens, each
# token to its own causal length
BATCHED_HEADS_MAX_BATCH = 1       # decode batches up to this size gather all KV heads at once
# (measured, one core: batch 1 at 512 tokens 32.1 -> 29.0 ms a step; batch 32 99 -> 118 ms)


@dataclass(frozen=True)
class TorchPlan:
    slot_blocks: torch.Tensor                  # [N] block id each new token's K/V goes to
    slot_offsets: torch.Tensor                 # [N] offset inside that block
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, T] for decode: key t is valid
    parts: tuple[AttentionMetadata, AttentionMetadata] | None = None   # mixed: (decodes, prefills)
    # decode with very different context lengths: (row indices, their own metadata) per group
    groups: tuple[tuple[torch.Tensor, AttentionMetadata], ...] | None = None
    # prefill of short rows only, for the native prefix kernel: each row's new tokens ([S] int32)
    short_rows: torch.Tensor | None = None
    # prefill with a longer row, for the native chunk kernel (bf16): each row's new tokens
    chunk_rows: torch.Tensor | None = None
    # decode: one new token a row ([B] int32 ones), for the native int8 kernel
    decode_rows: torch.Tensor | None = None


def decode_groups(context_lens: list[int] | tuple[int, ...],
                  group_cost: int = GROUP_COST_TOKENS) -> list[list[int]]:
    """Split a decode batch into groups of similar context length, so that each group gathers
    (and masks) only up to its own longest context: the split of the length-sorted batch that
    minimises the padded tokens plus `group_cost` per group (dynamic programming)."""
    if len(context_lens) * max(context_lens) - sum(context_lens) <= group_cost:
        return [list(range(len(context_lens)))]     # less padding than one more group costs
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    lens = [context_lens[i] for i in order]
    n = len(lens)
    best = [0.0] + [float("inf")] * n          # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                     # rows i..j-1 form the last group
            cost = best[i] + (j - i) * lens[j - 1] + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _gather_head(cache: torch.Tensor, head: int, table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, kvh, bs, hd], table: [B, nb] -> one KV head's context [B, length, hd],
    # dense. (index_select is ~15x faster than advanced indexing here.)
    x = cache[:, head].index_select(0, table.reshape(-1))
    return x.view(table.shape[0], -1, cache.shape[-1])[:, :length]


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    # -> [B, kvh, length, hd]
    return torch.stack([_gather_head(cache, h, table, length) for h in range(cache.shape[1])], 1)


def _gather_kv(cache: LayerKV, table: torch.Tensor, length: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # -> dense K, V [B, kvh, length, hd] in `dtype` (int8 KV dequantized)
    if cache.is_quantized:
        return int8.dequantized(cache, table, length, dtype)
    k, v = _gather(cache.k, table, length), _gather(cache.v, table, length)
    return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))


class TorchAttentionBackend(AttentionBackend):
    """Runs on any torch device; its thresholds were measured on CPU cores (instance
    attributes, so a benchmark can set them)."""
    name = "torch"
    tuned_for = ("cpu",)

    def __init__(self, sdpa_decode_max_context: int = SDPA_DECODE_MAX_CONTEXT,
                 group_cost_tokens: int = GROUP_COST_TOKENS, native: bool | None = None) -> None:
        """`native`: decode attention on CPU by our kernel (backends/core/native.py) straight from the paged
        cache; None: where it is built and DISTSERVE_NATIVE is not 0 (decided on first use)."""
        self.sdpa_decode_max_context = sdpa_decode_max_context
        self.group_cost_tokens = group_cost_tokens
        self.batched_heads_max_batch = BATCHED_HEADS_MAX_BATCH
        self._native = native
        self._native_chunks: bool | None = None
        self._native_int8_op: bool | None = None

    @property
    def native(self) -> bool:
        if self._native is None:
            from backends.core import native
            self._native = native.enabled() and native.available()
        return self._native

    @property
    def native_chunks(self) -> bool:
        """Long prefill rows by our chunk kernel (bf16: csrc/chunk_attention.cpp on AVX-512 BF16
        hosts, chunk_attention_avx2.cpp on AVX2 ones), where it is built and the native kernels
        are on."""
        if self._native_chunks is None:
            from backends.core import native
            self._native_chunks = self.native and native.has("paged_chunk_attention")
        return self._native_chunks

    # -- per step ---------------------------------------------------------------------------
    def plan(self, meta: AttentionMetadata, tables: list[list[int]]) -> TorchPlan:
        bs, d, device = meta.block_size, meta.num_decodes, meta.slot_mapping.device
        slots = (meta.slot_mapping // bs, meta.slot_mapping % bs)
        qlens, clens = list(meta.query_lens), list(meta.context_lens)
        if 0 < d < meta.num_seqs:
            # Mixed: each part gets its own tables, so decodes never gather a long prompt's width.
            parts = (AttentionMetadata.build(d, qlens[:d], clens[:d], tables[:d], bs, device),
                     AttentionMetadata.build(0, qlens[d:], clens[d:], tables[d:], bs, device))
            return TorchPlan(*slots, parts=parts)
        # (the native kernel ignores groups; int8 or other-dtype KV still takes them)
        if d > 1 and len(groups := decode_groups(clens, self.group_cost_tokens)) > 1:
            return TorchPlan(*slots, decode_rows=torch.ones(d, dtype=torch.int32, device=device), groups=tuple(
                (torch.tensor(g, device=device),
                 AttentionMetadata.build(len(g), [1] * len(g), [clens[i] for i in g],
                                         [tables[i] for i in g], bs, device)) for g in groups))
        if d:
            t = torch.arange(meta.block_tables.shape[1] * bs, device=device)
            return TorchPlan(*slots, decode_mask=(t[None, :] < meta.seq_lens[:, None])[:, None, None, :],
                             decode_rows=torch.ones(d, dtype=torch.int32, device=device))
        if device.type == "cpu" and self.native:
            # token j of a row of q new tokens over c attends to the first c - q + j + 1 positions
            rows = torch.tensor(qlens, dtype=torch.int32, device=device)
            if max(qlens) <= NATIVE_MAX_QUERY:
                return TorchPlan(*slots, short_rows=rows)
            if self.native_chunks:
                return TorchPlan(*slots, chunk_rows=rows)
        return TorchPlan(*slots)

    # -- per layer --------------------------------------------------------------------------
    def store_kv(self, cache: LayerKV, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        # cache.k: [num_blocks, kvh, block_size, hd]; k: [N, kvh, hd]
        blocks, offsets = meta.plan.slot_blocks, meta.plan.slot_offsets
        if not cache.is_quantized:
            cache.k[blocks, :, offsets] = k.to(cache.k.dtype)       # no-op unless KV has its own dtype
            cache.v[blocks, :, offsets] = v.to(cache.v.dtype)
            return
        values, scales = quantize_kv(torch.stack((k, v)))         # K and V in one pass
        cache.k[blocks, :, offsets], cache.v[blocks, :, offsets] = values
        cache.k_scale[blocks, :, offsets], cache.v_scale[blocks, :, offsets] = scales

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_prefill:
            return self._prefill(q, k, v, cache, meta, scale)
        if meta.is_decode:
            return self._decode(q, cache, meta, scale)
        decodes, prefills = meta.plan.parts      # mixed (chunked prefill): decode rows come first
        d = meta.num_decodes
        return torch.cat([self._decode(q[:d], cache, decodes, scale),
                          self._prefill(q[d:], k[d:], v[d:], cache, prefills, scale)])

    def _prefill(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, scale: float):
        rows = meta.plan.short_rows if meta.plan.short_rows is not None else meta.plan.chunk_rows
        if rows is not None and self._native_int8(q, cache):
            # int8 KV (its K/V stored already): every row on the chunk kernel, from the cache
            return self._int8(q, cache, meta, rows, scale)
        if meta.plan.short_rows is not None and self._native_reads(q, cache) and \
                q.shape[-1] in (64, 128) and q.shape[1] // cache.k.shape[1] <= 8:
            # short rows (their K/V stored already): each token a query over its own prefix
            return torch.ops.distserve.paged_prefix_attention(
                q.contiguous(), cache.k, cache.v, meta.block_tables, meta.seq_lens,
                meta.plan.short_rows, scale).view(q.shape[0], -1)
        if meta.plan.chunk_rows is not None and self._native_reads(q, cache) and \
                q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128):
            # long rows (prefill, a prompt's tail after its cached prefix): K/V read from the cache
            return torch.ops.distserve.paged_chunk_attention(
                q.contiguous(), cache.k, cache.v, meta.block_tables, meta.seq_lens,
                meta.plan.chunk_rows, scale).view(q.shape[0], -1)
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
                table = meta.block_tables[i:i + 1, :-(-clen // meta.block_size)]
                ki, vi = _gather_kv(cache, table, clen, q.dtype)
                mask = torch.ones(qlen, clen, dtype=torch.bool, device=q.device).tril(diagonal=clen - qlen)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(qlen, -1))
            start += qlen
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _native_reads(self, q: torch.Tensor, cache: LayerKV) -> bool:
        """The native kernel can read this cache for these queries (CPU, float32/bf16 KV in
        the queries' dtype), and is built."""
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and \
            not cache.is_quantized and cache.k.dtype == q.dtype and self.native

    @property
    def native_int8(self) -> bool:
        """int8 KV read by our chunk kernel (`paged_attention_int8`: bf16 queries, AVX-512 BF16
        or AVX2 hosts), where it is built and the native kernels are on."""
        if self._native_int8_op is None:
            from backends.core import native
            self._native_int8_op = self.native and native.has("paged_attention_int8")
        return self._native_int8_op

    def _native_int8(self, q: torch.Tensor, cache: LayerKV) -> bool:
        return cache.is_quantized and q.device.type == "cpu" and q.dtype == torch.bfloat16 and \
            q.shape[-1] in (64, 128) and self.native_int8

    @staticmethod
    def _int8(q, cache: LayerKV, meta: AttentionMetadata, rows: torch.Tensor, scale: float):
        return torch.ops.distserve.paged_attention_int8(
            q.contiguous(), cache.k, cache.v, cache.k_scale, cache.v_scale, meta.block_tables,
            meta.seq_lens, rows, scale).view(q.shape[0], -1)

    def _decode(self, q, cache: LayerKV, meta: AttentionMetadata, scale: float):
        # One query per sequence; per KV head, its G query heads go in one bmm against that
        # head's dense gathered context (GQA without repeating K/V, and no transposing copies,
        # which on CPU cost more than the matmuls; SDPA's CPU flash kernel is slower for q_len 1).
        B, H, hd = q.shape
        if meta.plan.decode_rows is not None and self._native_int8(q, cache):
            return self._int8(q, cache, meta, meta.plan.decode_rows, scale)
        if self._native_reads(q, cache):
            # our kernel: straight from the paged cache, each sequence to its own length
            return torch.ops.distserve.paged_decode_attention(
                q.contiguous(), cache.k, cache.v, meta.block_tables, meta.seq_lens, scale).view(B, H * hd)
        if meta.plan.groups:
            out = q.new_empty(B, H * hd)
            for rows, sub in meta.plan.groups:
                out[rows] = self._decode(q[rows], cache, sub, scale)
            return out
        if B == 1 and meta.context_lens[0] <= self.sdpa_decode_max_context:
            # short context, nothing to mask: one fused SDPA call beats the per-head loop (with
            # a long context SDPA's GQA expansion costs more: 1024 tokens, ~2.8x the loop)
            k, v = _gather_kv(cache, meta.block_tables, meta.context_lens[0], q.dtype)
            o = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
            return o.reshape(1, H * hd)
        if cache.is_quantized:      # int8: all KV heads at once (int8.py), one converting copy
            return int8.decode(q, cache, meta.block_tables, meta.plan.decode_mask, scale)
        if B <= self.batched_heads_max_batch:      # measured: helps at batch 1, costs at 32
            return _decode_all_heads(q, cache, meta.block_tables, meta.plan.decode_mask, scale)
        kvh = cache.k.shape[1]
        qg = q.view(B, kvh, H // kvh, hd)                                  # [B, KVH, G, hd]
        mask = ~meta.plan.decode_mask[:, 0]                                # [B, 1, T]
        outs = [_decode_head(qg[:, h], cache, h, meta.block_tables, mask, scale) for h in range(kvh)]
        return torch.stack(outs, 1).reshape(B, H * hd)


def _decode_all_heads(q: torch.Tensor, cache: LayerKV, table: torch.Tensor, valid: torch.Tensor,
                      scale: float) -> torch.Tensor:
    # q: [B, H, hd] -> [B, H * hd]; every KV head in one gather and one batched matmul per side
    B, H, hd = q.shape
    kvh = cache.k.shape[1]
    k = int8.gather_blocks(cache.k, table, q.dtype, int8.scratch("k", q))        # [B, kvh, T, hd]
    v = int8.gather_blocks(cache.v, table, q.dtype, int8.scratch("v", q))
    qg = q.view(B, kvh, H // kvh, hd)                                            # [B, kvh, G, hd]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale               # [B, kvh, G, T]
    probs = scores.masked_fill_(~valid, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, H * hd)


def _decode_head(q: torch.Tensor, cache: LayerKV, head: int, table: torch.Tensor,
                 mask: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, G, hd], mask: [B, 1, T] True where padding -> [B, G, hd]
    T = mask.shape[-1]
    k = _gather_head(cache.k, head, table, T)                          # [B, T, hd]
    v = _gather_head(cache.v, head, table, T)
    if k.dtype != q.dtype:                                             # KV in its own dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    scores = torch.bmm(q, k.transpose(1, 2)).float() * scale           # [B, G, T]
    probs = scores.masked_fill_(mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.bmm(probs, v)
