"""Our native quantized linear kernel (backends/core/csrc/quant_linear.cpp): int4 (GGUF Q4_x) and
8-bit (Q8_0) codes against a float64 reference on the same weights, in both activation dtypes;
the packed layout round trip; each row's result independent of the rows beside it (a verify
step's rows give what plain steps give); the checks on its inputs; and the model's int4 layers
and tied head on it, against the float32 engine."""
from __future__ import annotations

import pytest
import torch

from backends.core import native
from backends.core import quant as Q
from backends.core.quant import GroupQuant, Int4Linear, pack_int4_native, unpack_int4_native
from tests.helpers import prefill_logits
from tests.test_quant import smollm_codes  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.has("quant_linear"):
        pytest.skip("the native quant_linear kernel is not built here (needs AVX-512 VNNI or AVX2, and "
                    "python -m backends.core.native --build)")


def codes(n: int, k: int, bits: int, group: int = 32, seed: int = 0) -> GroupQuant:
    """Random codes with fp16-exact scales and offsets (as GGUF stores them); Q8_0-like
    (offset -128 s) for 8 bits."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half().float()
    offset = (-128 * scale if bits == 8 else torch.randn(n, k // group, generator=g) * 0.05).half().float()
    return GroupQuant(q, scale, offset, bits)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32)])
def test_packed_layout_round_trips(bits, group):
    gq = codes(48, 256, bits, group)
    packed, so = pack_int4_native(gq)
    assert packed.shape == (3, 8, 64 * bits) and so.shape == (3, 8, 2, 16)
    assert torch.equal(unpack_int4_native(packed, so), gq.dequantize())
    ids = torch.tensor([47, 0, 16, 5])
    assert torch.equal(unpack_int4_native(packed, so, ids), gq.dequantize()[ids])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17, 40, 64, 70])
def test_kernel_matches_float64(bits, dtype, tol, rows):
    """Relative to the output's scale: float32 loses only the int16 rounding of x (1/65534 of a
    block's largest |x|); bf16 adds the output's rounding (2^-9)."""
    gq = codes(96, 576, bits, seed=rows)
    packed, so = pack_int4_native(gq)
    x = (torch.randn(rows, 576, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    y = torch.ops.distserve.quant_linear(x, packed, so)
    ref = x.double() @ gq.dequantize(torch.float64).T
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gives_the_same_bits_whatever_rows_share_its_pass(bits):
    """Within each path (1-4 rows: int16 dot products; 5-16 bf16 rows: AMX, each block's result
    scaled; 17-64: AMX on bf16-dequantized weights), a row's result does not depend on the rows
    beside it."""
    gq = codes(64, 256, bits)
    packed, so = pack_int4_native(gq)
    x = torch.randn(37, 256).bfloat16()
    op = torch.ops.distserve.quant_linear
    together = op(x, packed, so)
    for i in (0, 5, 20, 36):
        others = [j for j in range(37) if j != i]
        assert torch.equal(op(x[i:i + 1], packed, so), op(x[[i, (i + 1) % 37]], packed, so)[:1])
        assert torch.equal(op(x[i:i + 1], packed, so), op(x[[i, *others[:3]]], packed, so)[:1])
        assert torch.equal(op(x[[i, *others[:4]]], packed, so)[:1], op(x[[i, *others[:15]]], packed, so)[:1])
        assert torch.equal(op(x[[i, *others[:20]]], packed, so)[:1], together[i:i + 1])
    # 94 rows: a pass of 64 then one of 30, both dequantized; x's copy straddles them
    assert torch.equal(op(torch.cat([x, x, x[:20]]), packed, so)[37:74], together)


def test_kernel_refuses_what_it_cannot_read():
    gq = codes(32, 128, 4)
    packed, so = pack_int4_native(gq)
    op = torch.ops.distserve.quant_linear
    with pytest.raises(RuntimeError, match="codes must be"):
        op(torch.randn(1, 96), packed, so)                    # K does not match the codes
    with pytest.raises(RuntimeError, match="multiple of 32"):
        op(torch.randn(1, 100), packed, so)
    with pytest.raises(RuntimeError, match="scales/offsets"):
        op(torch.randn(1, 128), packed, so[:1])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, 128).half(), packed, so)
    with pytest.raises(RuntimeError, match="dense rows"):
        op(torch.randn(128, 2).T, packed, so)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_int4_native(codes(40, 128, 4))


def test_int4_linear_takes_the_kernel_for_few_bf16_rows_and_dense_beyond():
    gq = codes(64, 256, 4)
    dense = gq.dequantize(torch.bfloat16)
    layer = Int4Linear(gq, torch.bfloat16, dense=dense)
    assert layer.native and layer.num_planes == 0
    few = torch.randn(Q.NATIVE_INT4_MAX_ROWS, 256).bfloat16()
    assert torch.equal(layer(few), torch.ops.distserve.quant_linear(few, layer.native_codes, layer.native_so))
    many = torch.randn(Q.NATIVE_INT4_MAX_ROWS + 1, 256).bfloat16()
    assert torch.equal(layer(many), torch.nn.functional.linear(many, dense))
    assert torch.equal(layer.rows(torch.tensor([3, 60])), dense[[3, 60]])
    layer.dense = None                                  # int4 only: the kernel at any row count
    assert torch.equal(layer(many), torch.ops.distserve.quant_linear(many, layer.native_codes, layer.native_so))
    assert torch.equal(layer.rows(torch.tensor([3, 60])), dense[[3, 60]])
    assert not Int4Linear(gq, torch.float32).native      # float32 keeps torch's exact kernel


def test_real_model_bf16_int4_logits_stay_as_close_as_dense_bf16(smollm_codes):
    """The default model's decode-weight format (auto: GGUF codes on the kernel, the tied Q8_0 head
    too) against the float32 engine, beside the dense bf16 engine's error."""
    from backends.core.engine import EngineConfig, EngineLimits, LLMEngine
    config, sd = smollm_codes
    limits = EngineLimits(num_kv_blocks=16)
    ref = LLMEngine(config, sd, EngineConfig(dtype="float32", weights="bf16", limits=limits))
    engines = {fmt: LLMEngine(config, sd, EngineConfig(weights=fmt, limits=limits)) for fmt in ("auto", "bf16")}
    assert engines["auto"].runner.model.lm_head.native and engines["auto"].runner.model.layers[0].down_proj.native
    prompt = list(range(3000, 3006))                     # 6 rows: the kernel's range
    want = prefill_logits(ref, prompt)
    err = {fmt: (prefill_logits(e, prompt) - want).abs().max().item() for fmt, e in engines.items()}
    assert err["auto"] < 1.5 * err["bf16"], err
