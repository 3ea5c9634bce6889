"""Engine behaviour on the default model: batching, block sizes, the prefill->decode hand-off,
preemption, KV accounting and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.sampling import SamplingParams
from tests.helpers import GREEDY, assert_no_leaks, generate, make_engine, run_to_completion

TEXTS = ["The capital of France is", "def add(a, b):", "Hello! My name is",
         "In 1492, Columbus", "The quick brown fox jumps over the lazy dog. " * 5,
         "Water boils at", "1, 2, 3, 4, 5,", "<|im_start|>user\nName three colours.<|im_end|>\n"
         "<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def prompts(smollm_tokenizer) -> list[list[int]]:
    return [smollm_tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def alone(smollm_fp32, prompts) -> list[list[int]]:
    """Greedy tokens of each prompt run alone (block size 16)."""
    engine = make_engine(*smollm_fp32, num_kv_blocks=64)
    out = [generate(engine, [p])[0] for p in prompts]
    assert_no_leaks(engine)
    return out


def test_batch_of_8_matches_each_alone(smollm_fp32, prompts, alone):
    assert len({len(p) for p in prompts}) > 4        # really mixed lengths
    engine = make_engine(*smollm_fp32, num_kv_blocks=128)
    assert generate(engine, prompts) == alone
    assert_no_leaks(engine)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_results_do_not_depend_on_block_size(smollm_fp32, prompts, alone, block_size):
    engine = make_engine(*smollm_fp32, block_size=block_size, num_kv_blocks=4096 // block_size)
    assert generate(engine, prompts[:4]) == alone[:4]
    assert_no_leaks(engine)


def test_preemption_under_kv_pressure_keeps_results(smollm_fp32, prompts, alone):
    # 8 prompts need ~40 blocks of 8 tokens at the end; 24 blocks force recompute-preemption.
    engine = make_engine(*smollm_fp32, block_size=8, num_kv_blocks=24)
    seen_preempt = False
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outs = engine.step()
        seen_preempt |= bool(engine.last_batch and engine.last_batch.preempted)
        assert engine.blocks.num_used <= 24
        for o in outs:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
    assert seen_preempt
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == alone
    assert_no_leaks(engine)


def _hand_off(prefill: LLMEngine, decode: LLMEngine, req_id: str, prompt: list[int],
              params: SamplingParams) -> list[int]:
    """Prefill on one engine, copy only the KV blocks, decode on the other."""
    prefill.add_request(req_id, prompt, params)
    (first,) = prefill.step()
    block_ids, num_tokens = prefill.export_kv(req_id)
    assert num_tokens == len(prompt)
    blocks = prefill.kv.read_blocks(block_ids)
    seeded = prefill.seqs[req_id].params          # the seed travels with the request
    prefill.release(req_id)
    decode.add_prefilled(req_id, prompt, first.new_token_ids[0], seeded)
    (seq,) = decode.admit_remote()                  # the scheduler admits it: blocks allocated
    assert seq.req_id == req_id and len(seq.block_ids) == len(block_ids)
    decode.kv.write_blocks(seq.block_ids, blocks)
    decode.kv_arrived(req_id)
    return first.new_token_ids + run_to_completion(decode)[req_id]


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=16, temperature=0.8,
                                                           top_p=0.9, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded-sampling"])
def test_prefill_here_decode_there_matches_one_engine(smollm_fp32, prompts, params):
    both = make_engine(*smollm_fp32, num_kv_blocks=64)
    expected = generate(both, [prompts[4]], params)[0]
    prefill = make_engine(*smollm_fp32, num_kv_blocks=64, role="prefill")
    decode = make_engine(*smollm_fp32, num_kv_blocks=64, role="decode")
    # Fill a few decode blocks first so the hand-off lands on different block ids.
    decode.add_prefilled("other", prompts[0], 1, GREEDY.with_seed())
    assert [s.req_id for s in decode.admit_remote()] == ["other"]
    decode.kv_arrived("other")                      # its KV is garbage; it only holds blocks
    assert _hand_off(prefill, decode, "x", prompts[4], params) == expected
    decode.abort("other")
    for e in (both, prefill, decode):
        assert_no_leaks(e)


def test_prefill_role_holds_kv_until_released(smollm_fp32, prompts):
    engine = make_engine(*smollm_fp32, num_kv_blocks=64, role="prefill")
    engine.add_request("a", prompts[4], GREEDY)
    engine.step()
    assert not engine.has_unfinished()            # nothing to decode here
    block_ids, _ = engine.export_kv("a")
    assert engine.blocks.num_used == len(block_ids) > 0
    engine.release("a")
    assert_no_leaks(engine)


def test_abort_frees_blocks_mid_decode(smollm_fp32, prompts):
    engine = make_engine(*smollm_fp32, num_kv_blocks=64)
    for i in range(3):
        engine.add_request(f"r{i}", prompts[i], GREEDY)
    engine.step()
    engine.step()
    for i in range(3):
        engine.abort(f"r{i}")
    assert_no_leaks(engine)


def test_stop_conditions(smollm_fp32, prompts, alone):
    engine = make_engine(*smollm_fp32, num_kv_blocks=64)
    stop_tok = alone[0][3]
    first = alone[0].index(stop_tok)
    out = generate(engine, [prompts[0]], SamplingParams(max_tokens=16, temperature=0,
                                                        stop_token_ids=(stop_tok,)))[0]
    assert out == alone[0][:first + 1]
    out = generate(engine, [prompts[0]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out == alone[0][:5]
    assert_no_leaks(engine)


def test_max_model_len_ends_generation(smollm_fp32, prompts):
    engine = make_engine(*smollm_fp32, num_kv_blocks=64, max_model_len=len(prompts[0]) + 3)
    engine.add_request("a", prompts[0], GREEDY)
    outs = [o for _ in range(10) for o in engine.step()]
    assert sum(len(o.new_token_ids) for o in outs) == 3
    assert outs[-1].finished and outs[-1].finish_reason.value == "length"
    assert_no_leaks(engine)


@pytest.mark.parametrize("kw, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(seed=-1), "seed"), (dict(stop=("",)), "stop"), (dict(stop_token_ids=(-2,)), "stop_token_ids"),
])
def test_bad_sampling_params_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_bad_requests_are_clear_errors(smollm_fp32):
    engine = make_engine(*smollm_fp32, num_kv_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("a", [5] * 64, GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("a", [5, 10**6], GREEDY)
    engine.add_request("a", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6], GREEDY)
    engine.abort("a")
    assert_no_leaks(engine)


def test_unknown_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        LLMEngine.from_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")


def test_gpu_device_without_a_gpu_is_a_clear_error(smollm_fp32):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        make_engine(*smollm_fp32, num_kv_blocks=8, device="cuda:0")
    with pytest.raises(ValueError, match="device"):
        make_engine(*smollm_fp32, num_kv_blocks=8, device="tpu")


def test_matmul_rows_are_bucketed():
    """Every batch size maps to one of a bounded set of matmul row counts (oneDNN builds and
    caches a primitive per count), with little padding, and small batches are not padded."""
    from backends.core.model import pad_rows, padded_rows
    rows = [padded_rows(n) for n in range(1, 4097)]
    assert rows[:64] == list(range(1, 65))
    assert all(n <= r <= n * 1.0625 for n, r in enumerate(rows, 1))
    assert rows == sorted(rows) and len(set(rows)) <= 160
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(pad_rows(x, 5)[:3], x) and not pad_rows(x, 5)[3:].any()
    assert pad_rows(x, 3) is x
