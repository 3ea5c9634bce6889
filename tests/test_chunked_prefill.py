"""Chunked prefill (Sarathi-style mixed steps): the same tokens as whole-prompt prefill, decodes
that keep flowing while a long prompt is prefilled in chunks, preemption and aborts mid-prompt,
no KV leaks."""
from __future__ import annotations

import pytest
import torch

from backends.core.sampling import SamplingParams
from backends.core.limits import EngineLimits
from tests.helpers import assert_no_leaks, generate, make_engine

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LENGTHS = (3, 40, 7, 90, 1, 25, 60)         # long and short prompts, mixed


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    """Greedy tokens with whole-prompt prefill (the default scheduler)."""
    return generate(make_engine(*tiny_llama, block_size=4, num_kv_blocks=256), prompts, PARAMS)


def chunked_engine(tiny_llama, budget: int, **kw):
    kw = {"block_size": 4, "num_kv_blocks": 256, "max_num_seqs": min(8, budget), **kw}
    return make_engine(*tiny_llama, chunked_prefill=True, max_num_batched_tokens=budget, **kw)


def run_steps(engine, prompts, params=PARAMS) -> tuple[list[list[int]], list]:
    """Generate; also return every step's batch."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {}
    batches = []
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
        batches.append(engine.last_batch)
    return [tokens[f"r{i}"] for i in range(len(prompts))], batches


@pytest.mark.parametrize("budget", [8, 32])
def test_chunked_gives_the_same_tokens(tiny_llama, prompts, reference, budget):
    engine = chunked_engine(tiny_llama, budget)
    tokens, batches = run_steps(engine, prompts)
    assert tokens == reference
    assert all(b.num_tokens <= budget for b in batches)
    assert any(0 < b.num_decodes < len(b.seqs) for b in batches), "no step mixed decodes and chunks"
    assert any(not all(b.is_sampled) for b in batches), "no prompt was split into chunks"
    assert_no_leaks(engine)


def test_decodes_keep_flowing_while_a_long_prompt_is_chunked(tiny_llama):
    short, long = list(range(5, 10)), list(range(3, 103))       # 5 and 100 tokens
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    def stall_steps(engine) -> tuple[int, int]:
        """(steps from the long prompt's arrival to its first token, of those without a token
        for the decoding request)."""
        engine.add_request("short", short, params)
        engine.step()                                           # "short" is decoding now
        engine.add_request("long", long, params)
        steps = stalls = 0
        while True:
            got = {o.req_id for o in engine.step()}
            steps += 1
            stalls += "short" not in got
            if "long" in got:
                return steps, stalls

    steps, stalls = stall_steps(chunked_engine(tiny_llama, 8, max_num_seqs=2))
    assert steps == -(-len(long) // 7) and stalls == 0          # 7 prompt tokens + 1 decode a step
    steps, stalls = stall_steps(make_engine(*tiny_llama, block_size=4, num_kv_blocks=256))
    assert steps == 1 and stalls == 1                           # whole prefill pre-empts decode


def test_first_token_only_after_the_last_chunk(tiny_llama, prompts, reference):
    engine = chunked_engine(tiny_llama, 16)
    engine.add_request("long", prompts[3], PARAMS)              # 90 tokens: 6 chunks
    outs = [engine.step() for _ in range(6)]
    assert [len(o) for o in outs] == [0] * 5 + [1]
    assert outs[-1][0].new_token_ids == reference[3][:1]
    assert engine.seqs["long"].num_cached == len(prompts[3])
    engine.abort("long")
    assert_no_leaks(engine)


def test_preemption_mid_prompt_keeps_results(tiny_llama, prompts, reference):
    engine = chunked_engine(tiny_llama, 16, num_kv_blocks=40)        # far too few blocks for all
    tokens, batches = run_steps(engine, prompts)
    assert any(b.preempted for b in batches)
    assert tokens == reference
    assert_no_leaks(engine)


def test_abort_mid_prompt_frees_its_blocks(tiny_llama, prompts):
    engine = chunked_engine(tiny_llama, 16)
    engine.add_request("a", prompts[3], PARAMS)
    assert engine.step() == []
    assert engine.blocks.num_used == 4 and engine.seqs["a"].num_cached == 16
    engine.abort("a")
    assert_no_leaks(engine)


def test_chunked_config_errors(tiny_llama):
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineLimits(max_num_seqs=16, max_num_batched_tokens=8, chunked_prefill=True)
    with pytest.raises(ValueError, match="a prefill engine has none"):
        make_engine(*tiny_llama, chunked_prefill=True, role="prefill")


def test_chunked_matches_on_the_default_model(smollm_fp32, smollm_tokenizer):
    texts = ["The capital of France is", "def add(a, b):",
             "The quick brown fox jumps over the lazy dog. " * 5, "Water boils at"]
    prompts = [smollm_tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = generate(make_engine(*smollm_fp32, num_kv_blocks=64), prompts, params)
    engine = make_engine(*smollm_fp32, num_kv_blocks=64, chunked_prefill=True,
                         max_num_batched_tokens=16, max_num_seqs=4)
    assert generate(engine, prompts, params) == expected
    assert_no_leaks(engine)
