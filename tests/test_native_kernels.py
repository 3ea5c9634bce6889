"""Our native CPU decode-attention kernel (backends/core/attention/csrc/paged_decode.cpp):
against a float64 reference in both dtypes, on the pool's strided layout with scattered
blocks and very different lengths; its input checks (a bad block id or length is refused,
never read); the engine's greedy tokens with it and without it; the build directory keyed by
torch and host."""
from __future__ import annotations

import pytest
import torch

from backends.core import attention as A
from backends.core.attention import native
from backends.core.attention.metadata import AttentionMetadata
from backends.core.kv_cache import LayerKV
from tests.helpers import generate, make_engine

pytestmark = pytest.mark.usefixtures("one_thread")
KVH, G, HD, BS = 3, 3, 64, 16


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.available():
        pytest.skip("native kernels not built on this host (python -m backends.core.attention.native --build)")


def pool_cache(context_lens, dtype, seed=0):
    """A layer of a 3-layer pool [blocks, layers, 2, KVH, BS, HD] (strided blocks), scattered
    block tables."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // BS) for n in context_lens)
    pool = torch.randn(need + 5, 3, 2, KVH, BS, HD, generator=g).to(dtype)
    perm = torch.randperm(need + 5, generator=g).tolist()
    tables, start = [], 0
    for n in context_lens:
        tables.append(perm[start:start + -(-n // BS)])
        start += -(-n // BS)
    return LayerKV(pool[:, 2, 0], pool[:, 2, 1]), tables


def reference(q, cache, tables, context_lens, scale):
    out = []
    for b, (table, n) in enumerate(zip(tables, context_lens)):
        k = cache.k[table].transpose(0, 1).reshape(KVH, -1, HD)[:, :n].double()
        v = cache.v[table].transpose(0, 1).reshape(KVH, -1, HD)[:, :n].double()
        qb = q[b].double().view(KVH, G, HD)
        out.append(((qb @ k.transpose(1, 2)) * scale).softmax(-1).matmul(v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("context_lens", [[1], [37], [16, 17, 15], [5, 900, 3, 256, 1000, 64, 2, 129]])
def test_kernel_matches_float64(dtype, tol, context_lens):
    cache, tables = pool_cache(context_lens, dtype)
    assert not cache.k.is_contiguous()                      # a layer's blocks are strided
    meta = AttentionMetadata.build(len(context_lens), [1] * len(context_lens), context_lens, tables, BS)
    q = torch.randn(len(context_lens), KVH * G, HD).to(dtype)
    out = torch.ops.distserve.paged_decode_attention(q, cache.k, cache.v, meta.block_tables,
                                                     meta.seq_lens, HD ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference(q, cache, tables, context_lens, HD ** -0.5)
    torch.testing.assert_close(out.reshape(len(context_lens), -1).double(), ref, rtol=tol, atol=tol)


def test_kernel_refuses_what_it_cannot_read_safely():
    cache, tables = pool_cache([40], torch.float32)
    meta = AttentionMetadata.build(1, [1], [40], tables, BS)
    q = torch.randn(1, KVH * G, HD)
    op = torch.ops.distserve.paged_decode_attention
    bad_block = meta.block_tables.clone()
    bad_block[0, 1] = cache.k.shape[0]
    with pytest.raises(RuntimeError, match="out of"):
        op(q, cache.k, cache.v, bad_block, meta.seq_lens, 1.0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        op(q, cache.k, cache.v, meta.block_tables, torch.tensor([41 + 2 * BS], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(q.bfloat16(), cache.k, cache.v, meta.block_tables, meta.seq_lens, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, cache.k, cache.v, meta.block_tables.int(), meta.seq_lens, 1.0)
    swapped = torch.randn(cache.k.shape[0], BS, KVH, HD).transpose(1, 2)   # the right shape, not dense
    with pytest.raises(RuntimeError, match="dense"):
        op(q, swapped, swapped, meta.block_tables, meta.seq_lens, 1.0)


def test_engine_greedy_tokens_with_and_without_the_kernel(smollm_fp32, smollm_tokenizer):
    """Float32, the default model: batched greedy decoding over prompts of different lengths
    gives the same tokens through the kernel and through the torch ops."""
    texts = ["The capital of France is", "def add(a, b):",
             "The quick brown fox jumps over the lazy dog. " * 12, "Water boils at"]
    prompts = [smollm_tokenizer.encode(t) for t in texts]
    before = A._TORCH._native
    try:
        out = {}
        for on in (False, True):
            A._TORCH._native = on
            out[on] = generate(make_engine(*smollm_fp32, num_kv_blocks=64), prompts)
    finally:
        A._TORCH._native = before
    assert out[True] == out[False] and all(len(t) > 0 for t in out[True])


def test_build_directory_is_keyed_by_torch_and_host():
    d = native.build_dir()
    assert torch.__version__.replace("+", "_") in d.name and d.parent.name == "build"
    assert native.library_path().is_file()
