"""The decode step's layer stack in one native call (backends/core/layer_stack.py,
csrc/layer_stack.cpp) against the Python layer loop it replaces, on the default model's weights:
the same bits for decode steps and short verify rows (each row to its own causal length), the
same K/V written (bf16, and int8 with its scales), the same greedy tokens; where it steps aside;
and the checks on what it writes."""
from __future__ import annotations

import pytest
import torch

from backends.core import native
from backends.core.attention import AttentionMetadata
from backends.core.engine import EngineConfig, EngineLimits, LLMEngine
from backends.core.layer_stack import LayerStack
from backends.core.sampling import SamplingParams
from tests.helpers import assert_no_leaks, generate
from tests.test_quant import smollm_codes  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
BS = 16


@pytest.fixture(scope="module", autouse=True)
def built():
    if not (native.has("decode_layers") and native.has("quant_linear")):
        pytest.skip("the native layer stack needs quant_linear (AVX-512 VNNI or AVX2) and "
                    "python -m backends.core.native --build")


@pytest.fixture(scope="module", params=["auto", "int8"])
def engine(smollm_codes, request):
    """A decode instance's model: int4 on our kernel (a dense copy beside it past 64 rows); bf16
    KV, and int8 KV (quantized by the stack as the Python loop's store_kv does it)."""
    if request.param == "int8" and not native.has("paged_attention_int8"):
        pytest.skip("int8 KV's attention kernel is not built here (AVX-512 BF16 or AVX2)")
    config, sd = smollm_codes
    # the greedy test runs the same prompts twice: where the chunk kernel is not built, a prompt's
    # tail after its cached prefix runs SDPA over the gathered context and may round differently
    # from its fresh prefill, so there the prefix cache is off
    return LLMEngine(config, sd, EngineConfig(weights="auto", role="decode", kv_dtype=request.param,
                                              prefix_caching=native.has("paged_chunk_attention"),
                                              limits=EngineLimits(num_kv_blocks=256, chunked_prefill=True)))


def _forward(model, kv, qlens, clens, tables, ids, stack: bool, n_dec: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of one packed step, and the K/V pool after it, with or without the stack.
    `n_dec`: the leading sequences that decode (default: all if every row is one token, else none)."""
    if n_dec is None:
        n_dec = len(qlens) if all(q == 1 for q in qlens) else 0
    meta = AttentionMetadata.build(n_dec, qlens, clens, tables, BS)
    positions = [p for q, c in zip(qlens, clens) for p in range(c - q, c)]
    saved = model._layer_stack()
    x = torch.zeros(len(ids), model.config.hidden_size, dtype=torch.bfloat16)
    assert saved.query_lens(x, meta, kv)[0]             # a step the stack takes
    if not stack:
        model._stack = None
    try:
        hidden = model(torch.tensor(ids), torch.tensor(positions), meta, kv)
    finally:
        model._stack = saved
    return hidden, kv.data.clone()


def _prefill(model, kv, prompts, tables):
    for p, t in zip(prompts, tables):
        meta = AttentionMetadata.build(0, [len(p)], [len(p)], [t], BS)
        model(torch.tensor(p), torch.arange(len(p)), meta, kv)


@pytest.mark.parametrize("n_dec,qlens", [
    (None, [1]), (None, [1, 1, 1, 1, 1]), (None, [5]), (None, [3, 1, 4]), (None, [8, 8]),
    (None, [1] * 20), (None, [5] * 8),
    (2, [1, 1, 4]), (7, [1] * 7 + [3]), (12, [1] * 12 + [5, 2])])      # mixed: decodes + verify rows
def test_stack_gives_the_python_loops_bits(engine, n_dec, qlens):
    """Decode steps (one token each), verify-like rows (several new tokens a sequence, the
    paged prefix kernel) and mixed steps of both (a speculative step where some sequences carry
    a draft), to 16 rows and past (the int4 kernel's two AMX paths): hidden states and the pool
    equal bit for bit."""
    model, kv = engine.runner.model, engine.runner.kv
    assert model._layer_stack() is not None
    g = torch.Generator().manual_seed(len(qlens))
    lengths = (37, 70, 15, 130, 64)
    prompts = [torch.randint(100, 40_000, (lengths[i % 5],), generator=g).tolist() for i in range(len(qlens))]
    tables = [list(range(10 * i, 10 * i + 10)) for i in range(len(qlens))]
    _prefill(model, kv, prompts, tables)
    clens = [len(p) + q for p, q in zip(prompts, qlens)]
    ids = torch.randint(100, 40_000, (sum(qlens),), generator=g).tolist()
    before = kv.data.clone()
    fast, fast_kv = _forward(model, kv, qlens, clens, tables, ids, stack=True, n_dec=n_dec)
    kv.data.copy_(before)
    slow, slow_kv = _forward(model, kv, qlens, clens, tables, ids, stack=False, n_dec=n_dec)
    assert torch.equal(fast, slow)
    assert torch.equal(fast_kv, slow_kv)
    assert not torch.equal(fast_kv, before)            # the new tokens' K/V were written


def test_greedy_tokens_match_with_the_stack_off(engine, monkeypatch):
    """3 sequences, then 20 (past 16 rows the int4 kernel dequantizes to bf16 tiles)."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    few = [[1, 504, 3458, 282, 4649, 314], list(range(1000, 1040)), [28, 1130, 2671, 30]]
    many = few + [list(range(2000 + 50 * i, 2000 + 50 * i + 9 + i)) for i in range(17)]

    def run() -> list[list[int]]:
        out = [generate(engine, prompts, params) for prompts in (few, many)]
        assert_no_leaks(engine)
        return out

    model = engine.runner.model
    calls = []
    real = LayerStack.run
    monkeypatch.setattr(LayerStack, "run", lambda self, x, *a: calls.append(x.shape[0]) or real(self, x, *a))
    fast = run()
    assert calls and min(calls) <= 16 < max(calls), calls      # both AMX paths
    saved, model._stack = model._layer_stack(), None
    try:
        slow = run()
    finally:
        model._stack = saved
    assert fast == slow


def test_stack_steps_aside_where_it_does_not_apply(engine):
    model, kv = engine.runner.model, engine.runner.kv
    stack = model._layer_stack()
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
    decode = AttentionMetadata.build(1, [1], [5], [[0]], BS)
    assert stack.query_lens(x, decode, kv) == (True, None)
    assert stack.query_lens(x.float(), decode, kv)[0] is False                  # float32
    long_rows = torch.zeros(20, model.config.hidden_size, dtype=torch.bfloat16)
    prefill = AttentionMetadata.build(0, [20], [20], [[0, 1]], BS)
    assert stack.query_lens(long_rows, prefill, kv)[0] is False                # a prompt
    chunk = AttentionMetadata.build(1, [1, 20], [5, 20], [[0], [1, 2]], BS)     # a prompt chunk
    assert stack.query_lens(torch.zeros(21, x.shape[1], dtype=torch.bfloat16), chunk, kv)[0] is False
    verify = AttentionMetadata.build(1, [1, 4], [5, 4], [[0], [1]], BS)          # decode + verify row
    ok, short = stack.query_lens(torch.zeros(5, x.shape[1], dtype=torch.bfloat16), verify, kv)
    assert ok and short.tolist() == [4]


def test_a_slot_outside_the_pool_is_refused(engine):
    model, kv = engine.runner.model, engine.runner.kv
    stack = model._layer_stack()
    meta = AttentionMetadata.build(1, [1], [5], [[0]], BS)
    bad = type(meta.plan)(slot_blocks=torch.tensor([kv.data.shape[0]]), slot_offsets=torch.tensor([4]))
    meta = type(meta)(**{**meta.__dict__, "plan": bad})
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
    cos = torch.ones(1, model.config.head_dim, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        stack.run(x, cos, cos, meta, kv, None)
    good = AttentionMetadata.build(1, [1], [5], [[0]], BS)
    with pytest.raises(RuntimeError, match="num_decodes needs query_lens"):       # 1 decode, no others
        torch.ops.distserve.decode_layers(
            x, stack._weights, cos, cos, [c.k for c in kv.layers], [c.v for c in kv.layers],
            good.block_tables, good.seq_lens, good.plan.slot_blocks, good.plan.slot_offsets,
            torch.tensor([1], dtype=torch.int32), stack.heads, stack.kv_heads, stack.eps, stack.scale, 1, [], [])
