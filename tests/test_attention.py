"""Paged attention against a dense reference on every path of the torch backend (batch-1
short decodes through one SDPA call, longer or batched ones through the per-KV-head loop,
length groups, prefill chunks after a cached prefix, mixed batches), and the backend registry."""
from __future__ import annotations

import warnings

import pytest
import torch

from backends.core import attention as A
from backends.core.attention import AttentionMetadata, LayerKV, paged_attention, store_kv
from backends.core.attention.torch_backend import (GROUP_COST_TOKENS, SDPA_DECODE_MAX_CONTEXT,
                                                   TorchAttentionBackend, decode_groups)

KVH, G, HD, BS = 3, 3, 16, 16
SCALE = HD ** -0.5


def _reference(q, keys, values, scale, causal_from: int | None = None):
    """q [S, H, hd]; keys/values [T, KVH, hd] -> [S, H * hd]; query head h reads KV head h // G.
    Query i sits at position causal_from + i (default: the last S positions)."""
    S, T = q.shape[0], keys.shape[0]
    k = keys.repeat_interleave(G, dim=1).transpose(0, 1)           # [H, T, hd]
    v = values.repeat_interleave(G, dim=1).transpose(0, 1)
    scores = torch.einsum("shd,htd->hst", q, k) * scale
    first = T - S if causal_from is None else causal_from
    allowed = torch.arange(T)[None, :] <= (first + torch.arange(S))[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hst,htd->shd", probs, v).reshape(S, -1)


def _cache(context_lens: list[int], seed: int = 0) -> tuple[LayerKV, list[list[int]]]:
    """A random float32 layer cache in the pool's block-major layout (a layer's K cache is a
    strided view) and scattered block tables (block 0 unused)."""
    torch.manual_seed(seed)
    blocks_per_seq = [-(-n // BS) for n in context_lens]
    pool = torch.randn(1 + sum(blocks_per_seq), 2, 2, KVH, BS, HD)
    perm = (torch.randperm(sum(blocks_per_seq)) + 1).tolist()
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(perm[start:start + n])
        start += n
    return LayerKV(pool[:, 1, 0], pool[:, 1, 1]), tables


@pytest.fixture(params=[False, True], ids=["torch-ops", "native"])
def native(request):
    """Each decode path twice: the torch ops, and our kernel (backends/core/native.py)
    where this host has it built (./build.sh setup builds it)."""
    from backends.core import native as native_lib
    if request.param and not native_lib.available():
        pytest.skip("native kernels not built on this host (python -m backends.core.native --build)")
    before = A._TORCH._native
    A._TORCH._native = request.param
    yield request.param
    A._TORCH._native = before


def _context(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    return cache[table].transpose(1, 2).reshape(-1, KVH, HD)[:n]   # [T, KVH, hd]


@pytest.mark.parametrize("context_lens", [[1], [SDPA_DECODE_MAX_CONTEXT], [SDPA_DECODE_MAX_CONTEXT + 1],
                                          [1000], [5, 300, 700, 17], [5, 17, 3000, 2990]])
def test_decode_attention_matches_dense(context_lens, native):
    B = len(context_lens)
    cache, tables = _cache(context_lens)
    meta = AttentionMetadata.build(B, [1] * B, context_lens, tables, BS)
    if context_lens == [5, 17, 3000, 2990]:                   # the grouped path is the one tested
        assert len(meta.plan.groups) == 2                     # (the native kernel ignores them)
    q = torch.randn(B, KVH * G, HD)
    out = paged_attention(q, q[:, :KVH], q[:, :KVH], cache, meta, SCALE)
    for i, (n, table) in enumerate(zip(context_lens, tables)):
        ref = _reference(q[i:i + 1], _context(cache.k, table, n), _context(cache.v, table, n), SCALE)
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)


def _assert_rows_match_dense(out, q, cache, tables, context_lens, query_lens) -> None:
    start = 0
    for n, qlen, table in zip(context_lens, query_lens, tables):
        rows = slice(start, start + qlen)
        ref = _reference(q[rows], _context(cache.k, table, n), _context(cache.v, table, n), SCALE)
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-5)
        start += qlen


def test_prefill_chunks_and_mixed_batches_match_dense(native):
    """Decode rows first, then a fresh prompt (attends its own k/v) and a chunk after a cached
    prefix (reads the context back): each row against the dense reference."""
    context_lens, query_lens = [40, 9, 70, 33], [1, 1, 20, 33]
    cache, tables = _cache(context_lens, seed=1)
    meta = AttentionMetadata.build(2, query_lens, context_lens, tables, BS)
    assert meta.plan.parts is not None and meta.cu_seqlens_q.tolist() == [0, 1, 2, 22, 55]
    q = torch.randn(sum(query_lens), KVH * G, HD)
    k, v = torch.randn(sum(query_lens), KVH, HD), torch.randn(sum(query_lens), KVH, HD)
    store_kv(cache, k, v, meta)
    out = paged_attention(q, k, v, cache, meta, SCALE)
    _assert_rows_match_dense(out, q, cache, tables, context_lens, query_lens)
    torch.testing.assert_close(_context(cache.k, tables[3], 33), k[22:])   # stored where it belongs


def test_short_prefill_rows_match_dense(native):
    """Rows of a few new tokens (speculative verify rows, short chunks; a fresh 4-token prompt
    among them): with the native kernel each token is a decode query to its causal length."""
    context_lens, query_lens = [40, 9, 4, 70], [3, 5, 4, 1]
    cache, tables = _cache(context_lens, seed=2)
    meta = AttentionMetadata.build(0, query_lens, context_lens, tables, BS)
    assert (meta.plan.short_rows is not None) == native
    q = torch.randn(sum(query_lens), KVH * G, HD)
    k, v = torch.randn(sum(query_lens), KVH, HD), torch.randn(sum(query_lens), KVH, HD)
    store_kv(cache, k, v, meta)
    out = paged_attention(q, k, v, cache, meta, SCALE)
    _assert_rows_match_dense(out, q, cache, tables, context_lens, query_lens)


def test_metadata_is_flat_and_validated():
    meta = AttentionMetadata.build(0, [3, 2], [5, 2], [[7, 8], [2]], 4)
    assert meta.cu_seqlens_q.tolist() == [0, 3, 5] and meta.positions.tolist() == [2, 3, 4, 0, 1]
    assert meta.slot_mapping.tolist() == [30, 31, 32, 8, 9]          # block * 4 + offset
    assert meta.block_tables.tolist() == [[7, 8], [2, 0]] and meta.seq_lens.tolist() == [5, 2]
    assert meta.backend is A.backend_for("cpu") and meta.is_prefill
    with pytest.raises(ValueError, match="query_len <= context_len"):
        AttentionMetadata.build(0, [3], [2], [[0]], 4)


def test_decode_groups_split_only_when_padding_costs_more_than_a_group():
    assert [sorted(g) for g in decode_groups([100, 120, 90])] == [[0, 1, 2]]   # similar: one group
    assert decode_groups([10, 4000, 12, 3990]) == [[0, 2], [3, 1]]       # two clusters
    lens = [18, 21, 24, 38, 44, 49, 97, 106, 141, 193, 275, 295, 318, 403, 413, 422, 442, 501,
            546, 562, 575, 636, 669, 692, 692, 752, 786, 787, 839, 870, 881, 886]
    groups = decode_groups(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    padded = sum(len(g) * max(lens[i] for i in g) + GROUP_COST_TOKENS for g in groups)
    assert 1 < len(groups) < len(lens) and padded < len(lens) * max(lens) + GROUP_COST_TOKENS


def test_backend_thresholds_are_its_own():
    never_group = TorchAttentionBackend(group_cost_tokens=10 ** 12)
    assert len(decode_groups([5, 17, 3000, 2990], never_group.group_cost_tokens)) == 1
    assert A.backend_for("cpu").sdpa_decode_max_context == SDPA_DECODE_MAX_CONTEXT


def test_registry_is_keyed_by_device_type_and_names_the_registered_ones():
    assert A.registered() == {"cpu": "torch", "cuda": "torch"}
    with pytest.raises(ValueError, match=r"no attention backend for device type 'meta'; "
                                         r"registered: cpu \(torch\), cuda \(torch\)"):
        A.backend_for("meta")
    with pytest.raises(ValueError, match="AttentionBackend"):
        A.register_backend("xpu", object())
    with warnings.catch_warnings(record=True) as caught:      # generic code on a GPU: said aloud
        warnings.simplefilter("always")
        A.registry._WARNED.discard("cuda")
        assert A.backend_for("cuda") is A.backend_for("cpu")
    assert any("tuned for cpu" in str(w.message) for w in caught)
