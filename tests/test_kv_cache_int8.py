"""int8 KV cache: the block byte layout, quantization error bounds, attention against a dense
reference, the real model's greedy agreement with bf16 KV, and the prefill -> decode hand-off
(same tokens as one engine; a KV dtype mismatch between the phases is refused clearly)."""
from __future__ import annotations

import math

import pytest
import torch

from backends.core.attention import AttentionMetadata, LayerKV, paged_attention, store_kv
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.kv_cache import KVLayout, KVPool, dequantize_kv, quantize_kv
from backends.core.messages import DecodeRequest, Failed, PrefillRequest
from backends.core.sampling import SamplingParams
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillWorker
from kvtransfer import make_exporter, make_importer
from tests.helpers import GREEDY, assert_no_leaks, generate

KVH, G, HD, BS = 3, 3, 16, 16
SCALE = HD ** -0.5
SMOLLM2 = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)


# ---- layout and quantization ----------------------------------------------------------------

def test_block_holds_values_and_scales_and_smollm2_gets_1_94x_the_tokens():
    bf16, int8 = KVLayout(1, **SMOLLM2), KVLayout(1, **SMOLLM2, dtype="int8")
    assert bf16.block_nbytes == 30 * 2 * 3 * 16 * 64 * 2 == 368640
    assert int8.block_nbytes == 30 * 2 * 3 * 16 * (64 + 2) == 190080     # + one bf16 scale per row
    assert bf16.block_nbytes / int8.block_nbytes == pytest.approx(1.9394, abs=1e-4)
    gib = 1 << 30
    assert (gib // int8.block_nbytes) * 16 == 90368 and (gib // bf16.block_nbytes) * 16 == 46592
    with pytest.raises(ValueError, match="int4"):
        KVLayout(1, **SMOLLM2, dtype="int4")


def test_writes_stay_inside_their_block():
    layout = KVLayout(4, 2, BS, KVH, HD, "int8")
    pool = KVPool(layout)
    meta = AttentionMetadata.build(0, [BS], [BS], [[2]], BS)
    for layer in pool.layers:
        store_kv(layer, torch.randn(BS, KVH, HD), torch.randn(BS, KVH, HD), meta)
    raw = pool.data.view(4, -1)
    assert raw.shape[1] == layout.block_nbytes
    assert raw[2].count_nonzero() > 0.9 * layout.block_nbytes
    assert raw[[0, 1, 3]].count_nonzero() == 0


def test_quantize_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(64, KVH, HD) * torch.logspace(-6, 3, 64)[:, None, None]
    x[0] = 0
    values, scales = quantize_kv(x)
    absmax = x.abs().amax(-1)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert scales.dtype == torch.bfloat16 and values.abs().amax(-1)[1:].min() >= 126
    s = scales.float()
    assert torch.all(s >= absmax / 127) and torch.all(s <= absmax / 127 * (1 + 2 ** -7))
    err = (dequantize_kv(values, scales, torch.float32) - x).abs()
    assert torch.all(err <= s[..., None] / 2 * (1 + 1e-6))
    assert torch.equal(dequantize_kv(values[0], scales[0], torch.float32), x[0])   # zeros stay 0


# ---- attention against a dense reference ----------------------------------------------------

def _filled_cache(context_lens: list[int], seed: int = 0):
    """An int8 layer cache holding random float K/V for each sequence's whole context (stored by
    a prefill step), its block tables, and the float K/V themselves [T, KVH, hd] per sequence."""
    torch.manual_seed(seed)
    tables, start = [], 1                      # block 0 unused
    for n in context_lens:
        tables.append(list(range(start, start + -(-n // BS)))[::-1])   # scattered, reversed
        start += -(-n // BS)
    pool = KVPool(KVLayout(start, 2, BS, KVH, HD, "int8"))
    ks = [torch.randn(n, KVH, HD) * 2 for n in context_lens]
    vs = [torch.randn(n, KVH, HD) for n in context_lens]
    meta = AttentionMetadata.build(0, context_lens, context_lens, tables, BS)
    cache = pool.layers[1]
    store_kv(cache, torch.cat(ks), torch.cat(vs), meta)
    return cache, tables, ks, vs


def _read_back(cache: LayerKV, table: list[int], n: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    values = getattr(cache, which)[table].transpose(1, 2).reshape(-1, KVH, HD)[:n]
    scales = getattr(cache, which + "_scale")[table].transpose(1, 2).reshape(-1, KVH)[:n]
    return dequantize_kv(values, scales, torch.float32), scales.float()


def _dense(q, keys, values):
    # q [H, hd], keys/values [T, KVH, hd] -> [H, hd]
    k = keys.repeat_interleave(G, dim=1).transpose(0, 1)
    v = values.repeat_interleave(G, dim=1).transpose(0, 1)
    probs = (torch.einsum("hd,htd->ht", q, k) * SCALE).softmax(-1)
    return torch.einsum("ht,htd->hd", probs, v)


def _error_bound(q, k_scales, v_deq, v_scales):
    """Per query head: |out - exact| <= (e^(2 eps) - 1) max|v'| + max s_v / 2, where eps bounds
    the score error, SCALE * |q|_1 * max s_k / 2 (each K element is off by at most s_k / 2; a
    softmax with every logit off by at most eps moves each probability by a factor e^(+-2 eps)
    at most)."""
    kv = torch.arange(q.shape[0]) // G
    eps = SCALE * q.abs().sum(-1) * k_scales.amax(0)[kv] / 2
    return torch.expm1(2 * eps) * v_deq.abs().amax((0, 2))[kv] + v_scales.amax(0)[kv] / 2


@pytest.mark.parametrize("context_lens", [[7], [200], [600], [5, 300, 700, 17], [5, 17, 3000, 2990]])
def test_int8_decode_attention_matches_dense(context_lens):
    cache, tables, ks, vs = _filled_cache(context_lens)
    B = len(context_lens)
    q = torch.randn(B, KVH * G, HD)
    out = paged_attention(q, None, None, cache, AttentionMetadata.build(B, [1] * B, context_lens, tables, BS),
                          SCALE).view(B, KVH * G, HD)
    for i, (n, table) in enumerate(zip(context_lens, tables)):
        k_deq, k_scales = _read_back(cache, table, n, "k")
        v_deq, v_scales = _read_back(cache, table, n, "v")
        # the kernel's math is exact over what the cache holds (scales folded into scores/probs)
        torch.testing.assert_close(out[i], _dense(q[i], k_deq, v_deq), rtol=1e-5, atol=1e-5)
        # and within the quantization bound of attention over the unquantized K/V
        err = (out[i] - _dense(q[i], ks[i], vs[i])).abs().amax(-1)
        assert torch.all(err <= _error_bound(q[i], k_scales, v_deq, v_scales) + 1e-5)


def test_int8_prefill_chunk_reads_dequantized_prefix_and_fresh_prompt_attends_bf16_kv():
    cache, tables, ks, vs = _filled_cache([40, 24])
    # a 10-token chunk at the end of seq 0 (context 40: 30 cached) and seq 1 as a fresh prompt
    meta = AttentionMetadata.build(0, [10, 24], [40, 24], tables, BS)
    q = torch.randn(34, KVH * G, HD)
    k, v = torch.cat([ks[0][30:], ks[1]]), torch.cat([vs[0][30:], vs[1]])
    out = paged_attention(q, k, v, cache, meta, SCALE).view(34, KVH * G, HD)
    k0, _ = _read_back(cache, tables[0], 40, "k")
    v0, _ = _read_back(cache, tables[0], 40, "v")
    for j in range(10):          # query 30 + j sees keys [0, 30 + j]
        torch.testing.assert_close(out[j], _dense(q[j], k0[:31 + j], v0[:31 + j]), rtol=1e-5, atol=1e-5)
    for j in range(24):          # the fresh prompt: the unquantized k/v, exactly
        torch.testing.assert_close(out[10 + j], _dense(q[10 + j], ks[1][:j + 1], vs[1][:j + 1]),
                                   rtol=1e-5, atol=1e-5)


# ---- engines ---------------------------------------------------------------------------------

def test_engine_kv_dtype_is_wired_and_validated(tiny_llama):
    config, sd = tiny_llama
    assert LLMEngine.kv_layout(config, EngineConfig(dtype="float32")).dtype == "float32"
    assert LLMEngine.kv_layout(config, EngineConfig(kv_dtype="int8")).dtype == "int8"
    with pytest.raises(ValueError, match=r"kv_dtype must be one of .*'int8'.*got 'fp8'"):
        EngineConfig(kv_dtype="fp8")
    reference = generate(LLMEngine(config, sd, EngineConfig(dtype="float32",
                                                            limits=EngineLimits(block_size=4))), [[5, 6, 7]])
    for kv_dtype in ("bfloat16", "int8"):       # KV in another dtype than float32 activations
        engine = LLMEngine(config, sd, EngineConfig(dtype="float32", kv_dtype=kv_dtype,
                                                    limits=EngineLimits(block_size=4)))
        assert engine.kv.layout.dtype == kv_dtype
        assert len(generate(engine, [[5, 6, 7]])[0]) == len(reference[0])
        assert_no_leaks(engine)


@pytest.fixture(scope="module")
def smollm_bf16(gguf_path):
    from backends.core.weights import load_checkpoint
    return load_checkpoint(gguf_path, dtype=torch.bfloat16)


TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
         "The three primary colours are", "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n"
         "<|im_start|>assistant\n", "import numpy as np\n\n", "Photosynthesis is the process",
         "The quick brown fox jumps over the lazy dog. " * 6]


@pytest.fixture
def one_thread():
    """One torch thread (as an instance pinned to one core runs): with more threads than free
    cores, OpenMP's spinning made this test 10x slower on a loaded 2-core host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_int8_kv_greedy_agrees_with_bf16_kv_on_the_real_model(smollm_bf16, smollm_tokenizer, one_thread):
    """Teacher forcing: the int8-KV engine is fed the bf16-KV engine's greedy tokens and its own
    greedy pick is compared at every one of the 8 x 32 = 256 positions. Free-running the two
    and counting matches after a first divergence would compare different contexts; counting
    only up to it throws most positions away. Teacher forcing keeps every position and
    compares like with like."""
    config, sd = smollm_bf16
    prompts = [smollm_tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    make = lambda kv: LLMEngine(config, sd, EngineConfig(dtype="bfloat16", kv_dtype=kv,
                                                         limits=EngineLimits(num_kv_blocks=64)))
    bf16, int8 = make("bfloat16"), make("int8")
    reference = generate(bf16, prompts, params)
    picks = _teacher_forced_picks(int8, prompts, reference, params)
    agree = sum(p == r for ps, rs in zip(picks, reference) for p, r in zip(ps, rs))
    assert sum(map(len, picks)) == 256
    assert agree >= 0.95 * 256, f"int8 KV agrees with bf16 KV on {agree}/256 greedy picks"
    assert_no_leaks(bf16)
    assert_no_leaks(int8)


def _teacher_forced_picks(engine: LLMEngine, prompts, reference, params) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    picks: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            picks[out.req_id] += out.new_token_ids
            seq = engine.seqs.get(out.req_id)
            if seq is not None:        # feed the reference token, not our own pick
                seq.output_ids[-1] = reference[int(out.req_id[1:])][len(picks[out.req_id]) - 1]
    return [picks[f"r{i}"] for i in range(len(prompts))]


# ---- prefill -> decode hand-off --------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True)


def _pair(config, sd, prefill_kv: str, decode_kv: str):
    pcfg = EngineConfig(dtype="float32", kv_dtype=prefill_kv, role="prefill",
                        limits=EngineLimits(block_size=4, num_kv_blocks=32))
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0")
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter)
    dengine = LLMEngine(config, sd, EngineConfig(dtype="float32", kv_dtype=decode_kv, role="decode",
                                                 limits=EngineLimits(block_size=4, num_kv_blocks=16)))
    return prefill, DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")


def _hand_off(prefill: PrefillWorker, decode: DecodeWorker, prompts: list[list[int]]) -> dict[str, list]:
    reqs = [PrefillRequest(f"r{i}", p, PARAMS) for i, p in enumerate(prompts)]
    for r in reqs:
        prefill.submit(r)
    results = {}
    while len(results) < len(reqs):
        results.update((res.req_id, res) for _, res in prefill.step())
    for r in reqs:
        res = results[r.req_id]
        params = SamplingParams(**{**r.params.__dict__, "seed": res.seed})
        decode.submit(DecodeRequest(r.req_id, r.prompt_ids, res.first_token_id, params, res.kv))
    outs: dict[str, list] = {r.req_id: [results[r.req_id].first_token_id] for r in reqs}
    while decode.has_work():
        for _, o in decode.step():
            outs[o.req_id] += list(getattr(o, "token_ids", [])) + ([o.error] if isinstance(o, Failed) else [])
    prefill.step()                          # collects the released leases
    return outs


def test_int8_hand_off_gives_the_tokens_of_one_engine(tiny_llama):
    config, sd = tiny_llama
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 22)]
    one = LLMEngine(config, sd, EngineConfig(dtype="float32", kv_dtype="int8",
                                             limits=EngineLimits(block_size=4)))
    reference = generate(one, prompts, PARAMS)
    prefill, decode = _pair(config, sd, "int8", "int8")
    try:
        outs = _hand_off(prefill, decode, prompts)
        assert [outs[f"r{i}"] for i in range(3)] == reference
        num_blocks = sum(math.ceil(len(p) / 4) for p in prompts)
        assert decode.kv_bytes == num_blocks * prefill.exporter.pool.layout.block_nbytes
        for engine in (one, prefill.engine, decode.engine):
            assert_no_leaks(engine)
    finally:
        decode.close()
        prefill.close()


def test_kv_dtype_mismatch_between_phases_fails_the_request_clearly(tiny_llama):
    prefill, decode = _pair(*tiny_llama, "int8", "float32")
    try:
        outs = _hand_off(prefill, decode, [[3, 4, 5, 6, 7]])
        error = outs["r0"][-1]
        assert "KV dtype mismatch" in error and "int8" in error and "float32" in error
        assert prefill.exporter.num_leases == 0
        assert_no_leaks(prefill.engine)
        assert_no_leaks(decode.engine)
    finally:
        decode.close()
        prefill.close()
