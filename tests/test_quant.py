"""Quantized weights: the int4/int8 layers, GGUF codes kept as they are, and the weight formats."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends.core import quant
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.sampling import SamplingParams
from backends.core.quant import GroupQuant, Int4Linear, Int8Linear, quantize_int4
from backends.core.weights import load_checkpoint
from tests.helpers import generate, prefill_logits


def _codes(n: int, k: int, bits: int, group: int = 32, seed: int = 0) -> GroupQuant:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.01 + 0.001
    offset = torch.randn(n, k // group, generator=g) * 0.05
    return GroupQuant(q, scale, offset, bits)


@pytest.mark.parametrize("bits,n", [(4, 128), (8, 128), (4, 48)])   # 48: rows padded to 64
def test_int4_linear_is_exact_in_float32(bits: int, n: int) -> None:
    # float32 activations keep float32 scales: the kernel's weights are the codes' exact values
    gq = _codes(n, 256, bits)
    layer = Int4Linear(gq, torch.float32)
    x = torch.randn(5, 256)
    ref = x @ gq.dequantize().T
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    if quant.rows_supported():      # torch's packed layout is AVX-512's (the engine checks too)
        ids = torch.tensor([0, 7, 33, n - 1])
        torch.testing.assert_close(layer.rows(ids), gq.dequantize()[ids], rtol=0, atol=1e-6)


def test_int4_linear_bf16_and_dense_fallback() -> None:
    gq = _codes(192, 128, 4)
    dense = gq.dequantize(torch.bfloat16)
    layer = Int4Linear(gq, torch.bfloat16, dense=dense)
    most = max(quant.INT4_MAX_ROWS, quant.NATIVE_INT4_MAX_ROWS)        # either kernel's last
    small, big = torch.randn(2, 128, dtype=torch.bfloat16), torch.randn(most + 1, 128, dtype=torch.bfloat16)
    # bf16 scale/zero and bf16 output: relative error about 2^-8 of the output's magnitude
    ref = small.float() @ gq.dequantize().T
    assert (layer(small).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert torch.equal(layer(big), F.linear(big, dense))          # big batches take the dense GEMM


def test_quantize_int4_error_bound() -> None:
    w = torch.randn(64, 128)
    gq = quantize_int4(w, 32)
    err = (gq.dequantize() - w).abs().view(64, 4, 32)
    assert (err <= gq.scale[..., None] / 2 + 1e-6).all()          # round to nearest code


def test_int8_linear_per_channel() -> None:
    w = torch.randn(96, 128)
    layer = Int8Linear(w, torch.float32)
    x = torch.randn(3, 128)
    step = w.abs().amax(1) / 127                                    # one code per channel
    assert ((layer.rows(torch.arange(96)) - w).abs() <= step[:, None] / 2 + 1e-6).all()
    torch.testing.assert_close(layer(x), x @ layer.rows(torch.arange(96)).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [48, 128])
def test_group_size_errors(group: int) -> None:
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(64, 96 if group == 128 else 64), group)


def test_bad_weight_config() -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        EngineConfig(weights="int3")
    with pytest.raises(ValueError, match="weight_group_size"):
        EngineConfig(weight_group_size=48)


# ---------------------------------------------------------------- GGUF codes

def _write_quant_gguf(tiny_llama_hf, path: Path, qtypes: dict[str, str]) -> None:
    """The tiny Llama with chosen layers stored in GGUF quant types (llama.cpp conventions);
    prompts in the tests below stay under quant.INT4_MAX_ROWS tokens, so the int4 kernel runs."""
    from tests.test_weights import _finish, _gguf_name, _llama_cpp_permute
    c = tiny_llama_hf.config
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [(writer.add_block_count, c.num_hidden_layers),
                       (writer.add_context_length, c.max_position_embeddings),
                       (writer.add_embedding_length, c.hidden_size),
                       (writer.add_feed_forward_length, c.intermediate_size),
                       (writer.add_head_count, c.num_attention_heads),
                       (writer.add_head_count_kv, c.num_key_value_heads),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, c.rms_norm_eps),
                       (writer.add_token_list, [f"t{i}" for i in range(c.vocab_size)])]:
        add(value)
    for name, tensor in tiny_llama_hf.state_dict().items():
        w = tensor.numpy()
        if ".q_proj." in name:
            w = _llama_cpp_permute(w, c.num_attention_heads)
        elif ".k_proj." in name:
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        kind = next((t for part, t in qtypes.items() if part in name), None)
        if kind is None or w.ndim != 2:
            writer.add_tensor(_gguf_name(name), w)
        else:
            qt = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(w, qt), raw_dtype=qt)
    _finish(writer)


@pytest.fixture(scope="module")
def tiny_hf():
    from tests.helpers import save_tiny_hf_model
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return save_tiny_hf_model("llama", Path(d))


QTYPES = {"q_proj": "Q4_0", "k_proj": "Q4_0", "v_proj": "Q4_0", "mlp.": "Q4_1", "o_proj": "Q8_0",
          "lm_head": "Q8_0", "embed_tokens": "Q5_0"}


def test_gguf_codes_are_exact(tiny_hf, tmp_path: Path) -> None:
    _write_quant_gguf(tiny_hf, tmp_path / "q.gguf", QTYPES)
    _, dense = load_checkpoint(tmp_path / "q.gguf", torch.float32)
    _, codes = load_checkpoint(tmp_path / "q.gguf", torch.float32, keep_quantized=True)
    kinds = {k: type(v).__name__ for k, v in codes.items() if k.endswith("proj.weight") or "lm_head" in k}
    assert set(kinds.values()) == {"GroupQuant"}
    assert not isinstance(codes["model.embed_tokens.weight"], GroupQuant)   # Q5_0 does not map
    for name, v in codes.items():
        if isinstance(v, GroupQuant):
            assert torch.equal(v.dequantize(), dense[name]), name           # q/k rows un-permuted too


def test_gguf_formats_end_to_end(tiny_hf, tmp_path: Path) -> None:
    """In float32 the int4 kernel holds the GGUF codes exactly (4-bit as they are, Q8_0 as two
    planes), so it gives the dense engine's tokens; every other format generates."""
    _write_quant_gguf(tiny_hf, tmp_path / "q.gguf", QTYPES)
    config, codes = load_checkpoint(tmp_path / "q.gguf", torch.float32, keep_quantized=True)
    prompts = [[5, 9, 17, 33, 2, 70], [100, 3, 3, 3, 42]]
    ref = LLMEngine(config, codes, EngineConfig(dtype="float32", weights="bf16",
                                                limits=EngineLimits(num_kv_blocks=64)))
    expected = generate(ref, prompts)
    exact = LLMEngine(config, codes, EngineConfig(dtype="float32", weights="int4",
                                                  limits=EngineLimits(num_kv_blocks=64)))
    assert isinstance(exact.runner.model.layers[0].qkv_proj, Int4Linear)
    assert exact.runner.model.layers[0].o_proj.num_planes == 2           # Q8_0
    assert generate(exact, prompts) == expected
    for p in prompts:
        torch.testing.assert_close(prefill_logits(exact, p), prefill_logits(ref, p), rtol=1e-4, atol=1e-4)
    for fmt in ("auto", "int8"):
        engine = LLMEngine(config, codes, EngineConfig(dtype="float32", weights=fmt,
                                                       limits=EngineLimits(num_kv_blocks=64)))
        out = generate(engine, prompts)
        assert [len(t) for t in out] == [len(t) for t in expected]
        assert engine.blocks.num_used == 0


def test_auto_resolves_per_phase() -> None:
    from backends.core.weight_format import resolve_format
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_format("auto", "decode", cpu) == resolve_format("auto", "both", cpu) == "auto"
    assert resolve_format("auto", "prefill", cpu) == "bf16"             # compute-bound: dense
    assert resolve_format("auto", "decode", cpu, "float32") == "bf16"   # int4 kernel slow in fp32
    assert resolve_format("auto", "decode", gpu) == "bf16"
    assert resolve_format("int4", "prefill", cpu) == "int4"             # explicit formats hold


def test_auto_prefill_role_stays_dense(tiny_hf, tmp_path: Path) -> None:
    _write_quant_gguf(tiny_hf, tmp_path / "q.gguf", QTYPES)
    config, codes = load_checkpoint(tmp_path / "q.gguf", torch.bfloat16, keep_quantized=True)
    prefill = LLMEngine(config, codes, EngineConfig(weights="auto", role="prefill", prepack_weights=False))
    decode = LLMEngine(config, codes, EngineConfig(weights="auto", role="decode", prepack_weights=False))
    dense = quant.WideLinear if quant.widen_dense(torch.bfloat16, torch.device("cpu")) else torch.nn.Linear
    assert type(prefill.runner.model.layers[0].qkv_proj) is dense
    assert isinstance(decode.runner.model.layers[0].qkv_proj, Int4Linear)


def test_quantized_weights_need_cpu() -> None:
    from backends.core.weight_format import resolve_format
    for fmt in ("int4", "int8"):
        with pytest.raises(ValueError, match="CPU ones"):
            resolve_format(fmt, "decode", torch.device("cuda", 0))


def test_q8_planes_in_bf16_round_like_dense() -> None:
    """Q8_0 as two int4 planes with bf16 activations: the error against the exact weights is
    the size of dense bf16's (both round d to bf16's 8-bit mantissa), not larger."""
    g = torch.Generator().manual_seed(3)
    n, k = 128, 256
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.001).half().float()
    gq = GroupQuant(torch.randint(0, 256, (n, k), generator=g).to(torch.uint8), d, -128 * d, 8)
    exact = gq.dequantize()
    x = torch.randn(4, k, generator=g).bfloat16()
    ref = x.float() @ exact.T
    planes = Int4Linear(gq, torch.bfloat16)(x).float()
    dense = (x @ exact.bfloat16().T).float()
    err = lambda y: ((y - ref).abs().mean() / ref.abs().mean()).item()     # noqa: E731
    assert err(planes) <= 1.5 * err(dense) + 1e-3, (err(planes), err(dense))


# ---------------------------------------------------------------- the real default model

@pytest.fixture(scope="module")
def smollm_codes(gguf_path):
    return load_checkpoint(gguf_path, torch.bfloat16, keep_quantized=True)


# at most quant.INT4_MAX_ROWS tokens: prompts that long run on the int4 kernel even under auto
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(1000, 1012)), [28, 1130, 2671, 30, 216, 28, 1130]]


def test_real_model_int4_is_lossless_in_float32(gguf_path) -> None:
    """Q4_1 layers on the int4 kernel and the Q8_0 head as two int4 planes (what `int4` and, in
    bf16, `auto` run on this file): in float32 the kernel holds every GGUF weight exactly, so
    logits match the dense float32 engine to summation order and greedy tokens are identical."""
    config, codes = load_checkpoint(gguf_path, torch.float32, keep_quantized=True)
    dense = LLMEngine(config, codes, EngineConfig(dtype="float32", weights="bf16",
                                                  limits=EngineLimits(num_kv_blocks=32)))
    int4 = LLMEngine(config, codes, EngineConfig(dtype="float32", weights="int4",
                                                 limits=EngineLimits(num_kv_blocks=32)))
    for p in PROMPTS[:2]:
        torch.testing.assert_close(prefill_logits(int4, p), prefill_logits(dense, p), rtol=1e-3, atol=2e-3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)   # fp32 int4 is slow
    assert generate(int4, PROMPTS, params) == generate(dense, PROMPTS, params)


@pytest.mark.parametrize("fmt,tol", [("auto", 0.03), ("int4", 0.03), ("int8", 0.08)])
def test_real_model_bf16_formats_logits(smollm_codes, fmt: str, tol: float) -> None:
    """Against the bf16 dense engine, as max |logit diff| / max |logit|. auto only rounds scales
    to bf16 (like the dense weights themselves), so its gap is bf16 noise (measured ~1%); so is
    int4's on this file (its codes are kept as they are); int8 re-quantizes every layer per
    channel."""
    config, codes = smollm_codes
    ref = LLMEngine(config, codes, EngineConfig(weights="bf16", limits=EngineLimits(num_kv_blocks=16)))
    # unpacked dense fallback: up to INT4_MAX_ROWS (12) rows run on the int4 kernel
    engine = LLMEngine(config, codes, EngineConfig(weights=fmt, prepack_weights=False,
                                                   limits=EngineLimits(num_kv_blocks=16)))
    for p in PROMPTS:
        a, b = prefill_logits(engine, p), prefill_logits(ref, p)
        assert (a - b).abs().max() <= tol * b.abs().max(), fmt
        assert a.topk(5).indices.tolist()[0] in b.topk(5).indices.tolist()


def test_shared_weight_instances_match_private(smollm_codes, gguf_path, tmp_path: Path) -> None:
    """Two engines of one checkpoint and format on one host: the first writes the shared copy,
    the second maps it; both give the private engine's tokens."""
    from backends.core.weight_share import checkpoint_key, shared_info
    config, codes = smollm_codes
    prompts = [PROMPTS[0], list(range(2000, 2040))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cfg = dict(weights="auto", role="both", limits=EngineLimits(num_kv_blocks=16))
    private = LLMEngine(config, codes, EngineConfig(**cfg))
    shared = [LLMEngine(config, codes, EngineConfig(**cfg, shared_weights_dir=str(tmp_path / "w")),
                        checkpoint_id=checkpoint_key(gguf_path)) for _ in range(2)]
    assert shared_info(shared[0].runner.model).wrote and not shared_info(shared[1].runner.model).wrote
    expected = generate(private, prompts, params)
    assert all(generate(e, prompts, params) == expected for e in shared)


def test_prepacked_dense_matches_plain(smollm_codes) -> None:
    """oneDNN-prepacked weights compute what aten::mm computes on the plain layout."""
    from backends.core.quant import PackedLinear
    if not quant.can_prepack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("oneDNN prepacks bf16 weights only where its bf16 GEMM is native (not AVX2)")
    config, codes = smollm_codes
    plain = LLMEngine(config, codes, EngineConfig(weights="bf16", prepack_weights=False,
                                                  limits=EngineLimits(num_kv_blocks=16)))
    packed = LLMEngine(config, codes, EngineConfig(weights="bf16", limits=EngineLimits(num_kv_blocks=16)))
    auto = LLMEngine(config, codes, EngineConfig(weights="auto", limits=EngineLimits(num_kv_blocks=16)))
    assert isinstance(packed.runner.model.layers[0].qkv_proj, PackedLinear)
    layer = auto.runner.model.layers[0].qkv_proj               # int4, with a packed dense fallback
    most = quant.NATIVE_INT4_MAX_ROWS if layer.native else quant.INT4_MAX_ROWS_PACKED
    x = torch.randn(most + 1, layer.in_features, dtype=torch.bfloat16)
    dense = plain.runner.model.layers[0].qkv_proj.weight
    assert layer.dense is None and torch.equal(layer(x), F.linear(x, dense))
    prompt = list(range(3000, 3040))               # 40 rows: auto's layers take the packed GEMM
    torch.testing.assert_close(prefill_logits(packed, prompt), prefill_logits(plain, prompt), rtol=0, atol=1e-3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert generate(packed, [prompt], params) == generate(plain, [prompt], params)


def test_widened_dense_layers_compute_the_bf16_gemm(smollm_codes) -> None:
    """Where the bf16 GEMM is not native (an AVX2 host), a bf16 engine's dense layers hold their
    weights in float32 (WideLinear; an int4 layer's dense fallback too) and give what the bf16
    GEMM gives, to float32 summation order: the same bf16 values but for rare one-ulp roundings."""
    from backends.core.quant import WideLinear
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    wide = WideLinear(linear)
    assert wide.weight.dtype == torch.float32 and torch.equal(wide.weight, linear.weight.float())
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    y, ref = wide(x), F.linear(x, linear.weight, linear.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=8e-3, atol=8e-3)
    gq = _codes(96, 256, 4)
    layer = Int4Linear(gq, torch.bfloat16, dense=gq.dequantize(torch.bfloat16))
    big = torch.randn(max(quant.INT4_MAX_ROWS, quant.NATIVE_INT4_MAX_ROWS) + 1, 256, dtype=torch.bfloat16)
    before = layer(big)
    layer.widen()
    assert layer.dense.dtype == torch.float32
    torch.testing.assert_close(layer(big), before, rtol=8e-3, atol=8e-3)
    config, codes = smollm_codes
    engine = LLMEngine(config, codes, EngineConfig(weights="bf16", limits=EngineLimits(num_kv_blocks=16)))
    qkv = engine.runner.model.layers[0].qkv_proj
    widened = quant.widen_dense(torch.bfloat16, torch.device("cpu"))
    assert isinstance(qkv, WideLinear) == widened
    assert widened != quant.bf16_gemm_native()
