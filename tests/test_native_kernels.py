"""Our native CPU decode-attention kernel (backends/core/csrc/paged_decode.cpp):
against a float64 reference in both dtypes, on the pool's strided layout with scattered
blocks and very different lengths; its input checks (a bad block id or length is refused,
never read); the engine's greedy tokens with it and without it; the build directory keyed by
torch and host."""
from __future__ import annotations

import pytest
import torch

from backends.core import attention as A
from backends.core import native
from backends.core.attention.metadata import AttentionMetadata
from backends.core.kv_cache import LayerKV
from tests.helpers import generate, make_engine

pytestmark = pytest.mark.usefixtures("one_thread")
KVH, G, HD, BS = 3, 3, 64, 16


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.available():
        pytest.skip("native kernels not built on this host (python -m backends.core.native --build)")


def pool_cache(context_lens, dtype, seed=0, kvh=KVH, bs=BS, hd=HD):
    """A layer of a 3-layer pool [blocks, layers, 2, KVH, BS, HD] (strided blocks), scattered
    block tables."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // bs) for n in context_lens)
    pool = torch.randn(need + 5, 3, 2, kvh, bs, hd, generator=g).to(dtype)
    perm = torch.randperm(need + 5, generator=g).tolist()
    tables, start = [], 0
    for n in context_lens:
        tables.append(perm[start:start + -(-n // bs)])
        start += -(-n // bs)
    return LayerKV(pool[:, 2, 0], pool[:, 2, 1]), tables


def same_bits_on_two_threads(run, *args):
    """`run(*args)` (a kernel's (out, float64 want)) on one torch thread and then on two: the
    kernels split their work by sequence and KV head, so both must give the same bits. Returns
    the two-thread run. The kernel tests run one thread (conftest.one_thread); an instance
    given two cores runs two."""
    one, _ = run(*args)
    torch.set_num_threads(2)
    try:
        two = run(*args)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two[0])
    return two


def reference(q, cache, tables, context_lens, scale):
    out = []
    kvh, hd = cache.k.shape[1], cache.k.shape[3]
    for b, (table, n) in enumerate(zip(tables, context_lens)):
        k = cache.k[table].transpose(0, 1).reshape(kvh, -1, hd)[:, :n].double()
        v = cache.v[table].transpose(0, 1).reshape(kvh, -1, hd)[:, :n].double()
        qb = q[b].double().view(kvh, -1, hd)
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


@pytest.mark.parametrize("kvh,g,hd,bs", [(2, 1, 128, 16), (1, 8, 128, 32), (2, 5, 64, 8),   # fixed sizes
                                         (1, 9, 64, 16), (2, 4, 96, 16)])                 # generic
def test_kernel_shapes(kvh, g, hd, bs):
    """The compile-time-size path (head size 64/128, 1-8 query heads per KV head) and the
    generic one, other block sizes; contexts of one block (a one-block-wide table) and more."""
    for context_lens in ([1, bs - 1, bs], [bs + 1, 3 * bs, 1]):
        cache, tables = pool_cache(context_lens, torch.float32, kvh=kvh, bs=bs, hd=hd)
        block_tables = torch.tensor([t + [0] * (3 - len(t)) for t in tables])[:, :max(map(len, tables))]
        q = torch.randn(len(context_lens), kvh * g, hd)
        out = torch.ops.distserve.paged_decode_attention(
            q, cache.k, cache.v, block_tables.contiguous(), torch.tensor(context_lens, dtype=torch.int32),
            hd ** -0.5)
        ref = reference(q, cache, tables, context_lens, hd ** -0.5)
        torch.testing.assert_close(out.reshape(len(context_lens), -1).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_elementwise_ops_match_the_torch_ops(dtype, tol):
    from backends.core.model import RMSNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2 * 48, generator=g).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate.float()) * up.float())
    torch.testing.assert_close(torch.ops.distserve.silu_and_mul(x).float(), ref, rtol=tol, atol=tol)
    res, delta = torch.randn(7, 64, generator=g).to(dtype), torch.randn(7, 64, generator=g).to(dtype)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    total, normed = torch.ops.distserve.add_rms_norm(res, delta, norm.weight, norm.eps)
    torch.testing.assert_close(total, res + delta)
    with torch.no_grad():
        torch.testing.assert_close(normed.float(), norm(res + delta).float(), rtol=tol, atol=tol)
    qkv = torch.randn(5, 3 * 4 * 16, generator=g).to(dtype)              # q and k heads, then v
    heads = qkv[:, :2 * 4 * 16].view(5, 8, 16)                              # strided rows
    cos, sin = torch.randn(5, 16, generator=g).to(dtype), torch.randn(5, 16, generator=g).to(dtype)
    ref = heads.float() * cos[:, None].float() + heads.float().roll(8, -1) * sin[:, None].float()
    out = torch.ops.distserve.rope(heads, cos, sin)
    assert out.is_contiguous() and out.shape == heads.shape
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="even number"):
        torch.ops.distserve.silu_and_mul(x[:, :-1])


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


def test_build_directory_is_keyed_by_torch_host_and_sources(monkeypatch):
    d = native.build_dir()
    assert d.name == f"native-{torch.__version__.replace('+', '_')}-{native._key()}" and d.parent.name == "build"
    assert native.library_path().is_file()
    monkeypatch.setattr(native, "CFLAGS", native.CFLAGS + ("-DCHANGED",))
    assert native.build_dir() != d                   # another flag (or source, or CPU): another build


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefix_kernel_matches_float64(dtype, tol):
    """Several new tokens per sequence (verify rows, short chunks): token j of q over a context
    of c attends to its first c - q + 1 + j positions; K/V are read once per sequence."""
    context_lens, query_lens = [40, 5, 300, 16, 17], [3, 5, 8, 1, 2]
    cache, tables = pool_cache(context_lens, dtype, seed=3)
    meta = AttentionMetadata.build(0, query_lens, context_lens, tables, BS)
    q = torch.randn(sum(query_lens), KVH * G, HD).to(dtype)
    out = torch.ops.distserve.paged_prefix_attention(q, cache.k, cache.v, meta.block_tables, meta.seq_lens,
                                                     torch.tensor(query_lens, dtype=torch.int32), HD ** -0.5)
    # the reference: each token as its own decode query over its causal prefix
    rows = [(s, c - ql + 1 + j) for s, (ql, c) in enumerate(zip(query_lens, context_lens)) for j in range(ql)]
    want = reference(q.view(len(rows), -1), cache, [tables[s] for s, _ in rows], [n for _, n in rows], HD ** -0.5)
    assert (out.double().view(len(rows), -1) - want).abs().max().item() < tol


def test_prefix_kernel_refuses_bad_query_lengths():
    cache, tables = pool_cache([40, 9], torch.float32)
    meta = AttentionMetadata.build(0, [3, 2], [40, 9], tables, BS)
    op = torch.ops.distserve.paged_prefix_attention
    q = torch.randn(5, KVH * G, HD)
    for lens, match in (([3, 3], "sum to"), ([9, 2], "new tokens"), ([0, 5], "new tokens"), ([3], "one per sequence")):
        with pytest.raises(RuntimeError, match=match):
            op(q, cache.k, cache.v, meta.block_tables, meta.seq_lens, torch.tensor(lens, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="not built"):
        cache2, tables2 = pool_cache([40], torch.float32, hd=32)
        meta2 = AttentionMetadata.build(0, [2], [40], tables2, BS)
        op(torch.randn(2, KVH * G, 32), cache2.k, cache2.v, meta2.block_tables, meta2.seq_lens,
           torch.tensor([2], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("kvh,g,hd,bs", [(3, 3, 64, 16), (2, 1, 128, 16), (1, 8, 128, 32), (2, 5, 64, 32)])
def test_bf16_kernels_on_the_amx_tiles_and_off_them_agree_with_float64(kvh, g, hd, bs, monkeypatch):
    """bf16 attention runs on the AMX tiles where the CPU has them (block sizes of 16s, head size
    64/128, up to 16 query rows a task; DISTSERVE_AMX_ATTENTION=0 turns it off): decode tokens
    at contexts short (the scalar kernel) and long, a block's tail past the context (read, then
    masked; its V as zeros even where the pool holds NaN), and verify rows of 1-5 tokens (rows
    past 16 fall back)."""
    context_lens, query_lens = [1, 63, 64, 200, 3 * bs + 5], [1, 5, 2, 4, 3]
    cache, tables = pool_cache(context_lens, torch.bfloat16, seed=7, kvh=kvh, bs=bs, hd=hd)
    for table, n in zip(tables, context_lens):                      # NaN past every context
        cache.k[table[-1], :, n % bs or bs:] = float("nan")
        cache.v[table[-1], :, n % bs or bs:] = float("nan")
    meta = AttentionMetadata.build(0, query_lens, context_lens, tables, bs)
    q = torch.randn(sum(query_lens), kvh * g, hd).to(torch.bfloat16)
    rows = [(s, c - ql + 1 + j) for s, (ql, c) in enumerate(zip(query_lens, context_lens)) for j in range(ql)]
    want = reference(q.view(len(rows), -1), cache, [tables[s] for s, _ in rows], [n for _, n in rows], hd ** -0.5)
    dmeta = AttentionMetadata.build(len(context_lens), [1] * len(context_lens), context_lens, tables, bs)
    qd = torch.randn(len(context_lens), kvh * g, hd).to(torch.bfloat16)
    want_d = reference(qd, cache, tables, context_lens, hd ** -0.5)
    outs = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("DISTSERVE_AMX_ATTENTION", amx)
        out = torch.ops.distserve.paged_prefix_attention(
            q, cache.k, cache.v, meta.block_tables, meta.seq_lens, torch.tensor(query_lens, dtype=torch.int32),
            hd ** -0.5)
        assert (out.double().view(len(rows), -1) - want).abs().max().item() < 2e-2
        out_d = torch.ops.distserve.paged_decode_attention(qd, cache.k, cache.v, dmeta.block_tables,
                                                           dmeta.seq_lens, hd ** -0.5)
        torch.testing.assert_close(out_d.reshape(len(context_lens), -1).double(), want_d, rtol=2e-2, atol=2e-2)
        outs[amx] = out, out_d
    if native.cpu_has("amx_bf16", "amx_tile"):                      # the tiles ran: other rounding
        assert not torch.equal(outs["1"][1], outs["0"][1])
