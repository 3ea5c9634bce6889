"""Paged decode attention against a dense reference, on both of its paths (batch-1 short
contexts go through one SDPA call, longer or batched ones through the per-KV-head loop)."""
from __future__ import annotations

import pytest
import torch

from backends.core import attention as A
from backends.core.attention import AttentionMetadata

KVH, G, HD, BS = 3, 3, 16, 16


def _reference(q, keys, values, scale):
    """q [H, hd]; keys/values [T, KVH, hd] -> [H * hd], query head h reads KV head h // G."""
    k = keys.repeat_interleave(G, dim=1).transpose(0, 1)           # [H, T, hd]
    v = values.repeat_interleave(G, dim=1).transpose(0, 1)
    probs = (torch.einsum("hd,htd->ht", q, k) * scale).softmax(-1)
    return torch.einsum("ht,htd->hd", probs, v).reshape(-1)


@pytest.mark.parametrize("context_lens", [[1], [A.SDPA_DECODE_MAX_CONTEXT], [A.SDPA_DECODE_MAX_CONTEXT + 1],
                                          [1000], [5, 300, 700, 17], [5, 17, 3000, 2990]])
def test_decode_attention_matches_dense(context_lens):
    from backends.core.attention import decode_groups
    if context_lens == [5, 17, 3000, 2990]:
        assert len(decode_groups(context_lens)) == 2          # the grouped path is the one tested
    torch.manual_seed(0)
    B = len(context_lens)
    blocks_per_seq = [-(-n // BS) for n in context_lens]
    # the pool's block-major layout: a layer's K cache is a strided view
    pool = torch.randn(1 + sum(blocks_per_seq), 2, 2, KVH, BS, HD)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    perm = (torch.randperm(sum(blocks_per_seq)) + 1).tolist()      # scattered blocks, 0 unused
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(perm[start:start + n])
        start += n
    meta = AttentionMetadata.build(B, [1] * B, context_lens, tables, BS)
    q = torch.randn(B, KVH * G, HD)
    out = A._decode_attention(q, k_cache, v_cache, meta, HD ** -0.5)
    for i, (n, table) in enumerate(zip(context_lens, tables)):
        keys = k_cache[table].transpose(1, 2).reshape(-1, KVH, HD)[:n]   # [T, KVH, hd]
        values = v_cache[table].transpose(1, 2).reshape(-1, KVH, HD)[:n]
        torch.testing.assert_close(out[i], _reference(q[i], keys, values, HD ** -0.5),
                                   rtol=1e-5, atol=1e-5)


def test_decode_groups_split_only_when_padding_costs_more_than_a_group():
    from backends.core.attention import GROUP_COST_TOKENS, decode_groups
    assert [sorted(g) for g in decode_groups([100, 120, 90])] == [[0, 1, 2]]   # similar: one group
    assert decode_groups([10, 4000, 12, 3990]) == [[0, 2], [3, 1]]       # two clusters
    lens = [18, 21, 24, 38, 44, 49, 97, 106, 141, 193, 275, 295, 318, 403, 413, 422, 442, 501,
            546, 562, 575, 636, 669, 692, 692, 752, 786, 787, 839, 870, 881, 886]
    groups = decode_groups(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    padded = sum(len(g) * max(lens[i] for i in g) + GROUP_COST_TOKENS for g in groups)
    assert 1 < len(groups) < len(lens) and padded < len(lens) * max(lens) + GROUP_COST_TOKENS
