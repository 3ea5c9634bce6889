"""Our chunk attention kernel (long runs of new tokens, bf16: backends/core/csrc/chunk_attention.cpp
on AVX-512 BF16 hosts, chunk_attention_avx2.cpp on AVX2 ones, whichever this host builds): against
a float64 reference for prompts with and without a cached prefix, lengths on both sides of its 64-position chunks, the shapes we serve, the pool's strided blocks;
its input checks; the backend's choice of it for long prefill rows; and the default model's
prefill logits through it against torch's SDPA."""
from __future__ import annotations

import pytest
import torch

from backends.core import attention as A
from backends.core import native
from backends.core.attention.metadata import AttentionMetadata
from tests.helpers import make_engine, prefill_logits
from tests.test_native_kernels import BS, HD, KVH, G, pool_cache, same_bits_on_two_threads

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.has("paged_chunk_attention"):
        pytest.skip("the chunk attention kernel is not built here (needs AVX-512 BF16 or AVX2 and "
                    "python -m backends.core.native --build)")


def causal_reference(q, cache, tables, context_lens, query_lens, scale):
    """Each new token over its causal prefix, in float64: [N, H * hd]."""
    kvh, hd = cache.k.shape[1], cache.k.shape[3]
    out, start = [], 0
    for table, c, n in zip(tables, context_lens, query_lens):
        k = cache.k[table].transpose(0, 1).reshape(kvh, -1, hd)[:, :c].double()
        v = cache.v[table].transpose(0, 1).reshape(kvh, -1, hd)[:, :c].double()
        qs = q[start:start + n].double().view(n, kvh, -1, hd).permute(1, 0, 2, 3).reshape(kvh, -1, hd)
        scores = (qs @ k.transpose(1, 2)) * scale                    # [kvh, n * g, c]
        g = qs.shape[1] // n
        token = torch.arange(n).repeat_interleave(g)
        scores[:, torch.arange(n * g)[:, None], torch.arange(c)[None, :]] = torch.where(
            torch.arange(c)[None, :] < (c - n + 1 + token)[:, None], scores, float("-inf"))
        o = scores.softmax(-1) @ v                                   # [kvh, n * g, hd]
        out.append(o.view(kvh, n, g, hd).permute(1, 0, 2, 3).reshape(n, -1))
        start += n
    return torch.cat(out)


def run(query_lens, context_lens, kvh=KVH, g=G, hd=HD, bs=BS, seed=0):
    cache, tables = pool_cache(context_lens, torch.bfloat16, seed=seed, kvh=kvh, bs=bs, hd=hd)
    assert not cache.k.is_contiguous()                               # a layer's blocks are strided
    meta = AttentionMetadata.build(0, query_lens, context_lens, tables, bs)
    q = (torch.randn(sum(query_lens), kvh * g, hd, generator=torch.Generator().manual_seed(seed)) * 2).bfloat16()
    out = torch.ops.distserve.paged_chunk_attention(q, cache.k, cache.v, meta.block_tables, meta.seq_lens,
                                                    torch.tensor(query_lens, dtype=torch.int32), hd ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    return out.view(len(out), -1).double(), causal_reference(q, cache, tables, context_lens, query_lens, hd ** -0.5)


@pytest.mark.parametrize("query_lens,context_lens", [
    ([1], [1]), ([63], [63]), ([64], [64]), ([65], [65]), ([200], [200]),      # fresh prompts
    ([9], [300]), ([130], [1000]), ([64], [65]),                                 # after a cached prefix
    ([100, 3, 64, 1, 77], [100, 70, 200, 1, 300]),                               # several sequences
])
def test_kernel_matches_float64(query_lens, context_lens):
    """Within bf16's rounding of the output (and of P, as FlashAttention keeps it)."""
    out, want = run(query_lens, context_lens)
    assert (out - want).abs().max().item() < 2e-2


def test_threads_split_the_work_without_changing_a_bit():
    out, want = same_bits_on_two_threads(run, [100, 3, 64, 1, 77, 130], [100, 70, 200, 1, 300, 1000])
    assert (out - want).abs().max().item() < 2e-2


@pytest.mark.parametrize("routed", ["1", "0"])
def test_decode_and_verify_ops_on_either_kernel(monkeypatch, routed):
    """bf16 decode rows and short (verify) rows: paged_decode_attention and paged_prefix_attention
    run on this kernel where it is built and AMX is not used, unless DISTSERVE_CHUNK_ATTENTION=0
    (then on paged_decode.cpp's own); both ways against float64, so whichever kernel a host does
    not route to stays tested too. Contexts across the chunk-major path's chunks and prefetches."""
    monkeypatch.setenv("DISTSERVE_CHUNK_ATTENTION", routed)
    context_lens = [1, 70, 300, 1100]
    cache, tables = pool_cache(context_lens, torch.bfloat16, seed=3)
    meta = AttentionMetadata.build(len(context_lens), [1] * len(context_lens), context_lens, tables, BS)
    q = (torch.randn(len(context_lens), KVH * G, HD, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    out = torch.ops.distserve.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.seq_lens, HD ** -0.5)
    want = causal_reference(q, cache, tables, context_lens, [1] * len(context_lens), HD ** -0.5)
    assert (out.view(len(out), -1).double() - want).abs().max().item() < 2e-2
    query_lens = [5, 1, 8, 3]
    meta = AttentionMetadata.build(0, query_lens, context_lens[1:] + [9], tables[1:] + tables[:1], BS)
    q = (torch.randn(sum(query_lens), KVH * G, HD, generator=torch.Generator().manual_seed(4)) * 2).bfloat16()
    out = torch.ops.distserve.paged_prefix_attention(q, cache.k, cache.v, meta.block_tables, meta.seq_lens,
                                                     torch.tensor(query_lens, dtype=torch.int32), HD ** -0.5)
    want = causal_reference(q, cache, tables[1:] + tables[:1], context_lens[1:] + [9], query_lens, HD ** -0.5)
    assert (out.view(len(out), -1).double() - want).abs().max().item() < 2e-2


@pytest.mark.parametrize("kvh,g,hd,bs", [(2, 4, 128, 16), (1, 8, 64, 32), (3, 1, 64, 8), (2, 5, 128, 16)])
def test_kernel_shapes(kvh, g, hd, bs):
    """Head sizes 64 and 128, 1-8 query heads per KV head (a row block may span tokens), block
    sizes that do not divide a chunk's 64 positions."""
    out, want = run([37, 70], [90, 70], kvh=kvh, g=g, hd=hd, bs=bs, seed=1)
    assert (out - want).abs().max().item() < 2e-2


def test_kernel_refuses_what_it_does_not_run():
    cache, tables = pool_cache([40, 9], torch.bfloat16)
    meta = AttentionMetadata.build(0, [20, 2], [40, 9], tables, BS)
    op = torch.ops.distserve.paged_chunk_attention
    q = torch.randn(22, KVH * G, HD).bfloat16()
    lens = torch.tensor([20, 2], dtype=torch.int32)
    for bad, match in (([20, 3], "sum to"), ([20, 10], "new tokens"), ([0, 22], "new tokens"), ([22], "one per sequence")):
        with pytest.raises(RuntimeError, match=match):
            op(q, cache.k, cache.v, meta.block_tables, meta.seq_lens, torch.tensor(bad, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        op(q.float(), cache.k.float(), cache.v.float(), meta.block_tables, meta.seq_lens, lens, 1.0)
    with pytest.raises(RuntimeError, match="out of"):                # a block id outside the cache
        op(q, cache.k, cache.v, torch.full_like(meta.block_tables, 10_000), meta.seq_lens, lens, 1.0)
    cache96, tables96 = pool_cache([40, 9], torch.bfloat16, hd=96)
    meta96 = AttentionMetadata.build(0, [20, 2], [40, 9], tables96, BS)
    with pytest.raises(RuntimeError, match="head size 64 or 128"):
        op(torch.randn(22, KVH * G, 96).bfloat16(), cache96.k, cache96.v, meta96.block_tables, meta96.seq_lens, lens, 1.0)


def test_backend_takes_it_for_long_rows_only(monkeypatch):
    """Short rows (verify rows, <= NATIVE_MAX_QUERY) keep the prefix kernel; a longer row in the
    step takes the chunk kernel; with the native kernels off, neither."""
    backend = A._TORCH
    monkeypatch.setattr(backend, "_native", True)
    monkeypatch.setattr(backend, "_native_chunks", None)
    short = AttentionMetadata.build(0, [3, 8], [40, 9], [[0, 1, 2], [3]], BS)
    long = AttentionMetadata.build(0, [3, 9], [40, 9], [[0, 1, 2], [3]], BS)
    assert short.plan.short_rows is not None and short.plan.chunk_rows is None
    assert long.plan.chunk_rows is not None and long.plan.chunk_rows.tolist() == [3, 9]
    monkeypatch.setattr(backend, "_native", False)
    monkeypatch.setattr(backend, "_native_chunks", None)
    off = AttentionMetadata.build(0, [3, 9], [40, 9], [[0, 1, 2], [3]], BS)
    assert off.plan.chunk_rows is None and off.plan.short_rows is None


def test_model_prefill_logits_match_sdpa(smollm_fp32, monkeypatch):
    """The default model in bf16, through the kernel and through torch's SDPA: a 300-token
    prompt's last logits within bf16 noise of each other with the same top token; and greedy
    decoding of that prompt prefilled in chunks of 128 (each chunk after the cached ones) gives
    both paths' tokens identical for 8 tokens, or up to a step where the float32 model's two best
    logits are within bf16's resolution (0.25 at these magnitudes) and each path took one of them.
    (The prompt has one: after its first token, 494 leads 98 by 0.09 in float32, and the two
    bf16 paths took one each once the kernel's per-chunk packing changed its rounding.)"""
    from backends.core.sampling import SamplingParams
    from tests.helpers import generate
    config, sd = smollm_fp32
    prompt = [(7 * i + 13) % 40000 + 100 for i in range(300)]
    logits, tokens = {}, {}
    for on in (True, False):
        monkeypatch.setattr(A._TORCH, "_native_chunks", on)
        logits[on] = prefill_logits(make_engine(config, sd, dtype="bfloat16", num_kv_blocks=64), prompt).float()
        chunked = make_engine(config, sd, dtype="bfloat16", num_kv_blocks=64, chunked_prefill=True,
                              max_num_batched_tokens=128)
        tokens[on] = generate(chunked, [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    a, b = logits[True], logits[False]
    assert (a - b).abs().max().item() <= 0.03 * b.abs().max().item()
    assert a.argmax().item() == b.argmax().item()
    a, b = tokens[True][0], tokens[False][0]
    assert len(a) == len(b) == 8
    k = next((i for i in range(8) if a[i] != b[i]), 8)
    if k < 8:
        ref = prefill_logits(make_engine(config, sd, num_kv_blocks=64), prompt + a[:k]).float()
        (first, second), (t1, t2) = ref.topk(2).values.tolist(), ref.topk(2).indices.tolist()
        assert first - second < 0.25 and {a[k], b[k]} == {t1, t2}, (k, a, b, first, second)
