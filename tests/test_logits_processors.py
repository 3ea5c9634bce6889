"""Penalties, min_tokens and bad words (backends/core/logits_processors.py) against HF
transformers' logits processors on random logits, and the OpenAI formula for presence /
frequency penalties; SamplingParams' new fields through the message codec."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

from backends.core.logits_processors import process_batch, process_logits
from backends.core.messages import PrefillRequest, decode, encode
from backends.core.sampling import SamplingParams, resolve_eos
from backends.core.sequence import Sequence

V = 64


def _case(seed: int, prompt_len: int = 12, output_len: int = 9):
    rng = random.Random(seed)
    prompt = [rng.randrange(V) for _ in range(prompt_len)]
    output = [rng.randrange(V) for _ in range(output_len)]
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 4
    return logits, prompt, output


def _hf(processor, prompt: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([prompt + output]), logits.clone()[None])[0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, penalty):
    logits, prompt, output = _case(seed)
    ours = process_logits(logits, SamplingParams(repetition_penalty=penalty), prompt, output)
    torch.testing.assert_close(ours, _hf(RepetitionPenaltyLogitsProcessor(penalty), prompt, output, logits))
    assert not torch.equal(ours, logits)


def _openai(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula, token by token."""
    out = logits.clone()
    for token in set(output):
        count = output.count(token)
        out[token] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.8), (-1.0, 1.5), (2.0, -2.0)])
def test_presence_and_frequency_penalties_follow_openai(seed, presence, frequency):
    logits, prompt, output = _case(seed, output_len=20)
    p = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    torch.testing.assert_close(process_logits(logits, p, prompt, output),
                               _openai(logits, output, presence, frequency))
    torch.testing.assert_close(process_logits(logits, p, prompt, []), logits)   # output only


@pytest.mark.parametrize("num_out", [0, 3, 4, 7])
def test_min_tokens_matches_transformers(num_out):
    logits, prompt, output = _case(1, output_len=num_out)
    stop_ids = [5, 17]
    ours = process_logits(logits, SamplingParams(min_tokens=4, stop_token_ids=tuple(stop_ids)), prompt, output)
    hf = MinNewTokensLengthLogitsProcessor(len(prompt), 4, stop_ids)
    torch.testing.assert_close(ours, _hf(hf, prompt, output, logits))
    assert torch.isinf(ours[stop_ids]).all() == (num_out < 4)


@pytest.mark.parametrize("seed", range(6))
def test_bad_words_match_transformers(seed):
    logits, prompt, output = _case(seed)
    words = [[9], [output[-1], 30], [output[-2], output[-1], 31], [prompt[-1], 32], [7, 8, 33]]
    if seed % 2:                               # the prefix runs from the prompt into the output
        output = output[:1]
        words.append([prompt[-2], prompt[-1], output[0], 34])
    ours = process_logits(logits, SamplingParams(bad_words_ids=words), prompt, output)
    hf = NoBadWordsLogitsProcessor(words)
    torch.testing.assert_close(ours, _hf(hf, prompt, output, logits))
    assert torch.isinf(ours[9]) and torch.isinf(ours[30 if seed % 2 == 0 else 34])


def test_all_processors_compose_in_order():
    logits, prompt, output = _case(3, output_len=15)
    words = [[output[-1], 40], [41]]
    p = SamplingParams(max_tokens=32, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.6,
                       min_tokens=20, stop_token_ids=(2,), bad_words_ids=words)
    expected = _hf(RepetitionPenaltyLogitsProcessor(1.4), prompt, output, logits)
    expected = _openai(expected, output, 0.3, 0.6)
    expected = _hf(MinNewTokensLengthLogitsProcessor(len(prompt), 20, [2]), prompt, output, expected)
    expected = _hf(NoBadWordsLogitsProcessor(words), prompt, output, expected)
    torch.testing.assert_close(process_logits(logits, p, prompt, output), expected)


def test_process_batch_rows_and_verify_positions():
    plain = Sequence("a", [1, 2, 3], SamplingParams(temperature=0))
    penal = Sequence("b", [4, 5, 4], SamplingParams(temperature=0, repetition_penalty=1.5))
    penal.append_token(6)
    logits = torch.randn(5, V)
    assert process_batch(logits, [plain]) is logits              # nothing to do: no copy
    draft = [7, 8]                                               # penal verifies 1 + 2 positions
    out = process_batch(logits, [plain, penal], {penal: draft})
    torch.testing.assert_close(out[0], logits[0])
    for j in range(3):
        want = process_logits(logits[1 + j], penal.params, penal.prompt_ids, [6] + draft[:j])
        torch.testing.assert_close(out[1 + j], want)
    assert not torch.equal(out[3], process_logits(logits[3], penal.params, [4, 5, 4], [6]))


def test_needs_history_and_validation():
    assert not SamplingParams().needs_history
    for kw in ({"repetition_penalty": 1.1}, {"presence_penalty": 0.1}, {"frequency_penalty": -0.1},
               {"min_tokens": 1}, {"bad_words_ids": [[3]]}):
        assert SamplingParams(**kw).needs_history, kw
    for kw, match in (({"repetition_penalty": 0.0}, "repetition_penalty"),
                      ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                      ({"presence_penalty": 2.5}, "presence_penalty"),
                      ({"frequency_penalty": float("nan")}, "frequency_penalty"),
                      ({"min_tokens": 17}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
                      ({"bad_words_ids": [[]]}, "bad_words_ids"), ({"bad_words_ids": [1, 2]}, "bad_words_ids"),
                      ({"bad_words_ids": [[-1]]}, "bad_words_ids")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)


def test_new_fields_cross_the_message_codec():
    p = SamplingParams(max_tokens=8, seed=3, min_tokens=2, repetition_penalty=1.2, presence_penalty=0.5,
                       frequency_penalty=-0.25, bad_words_ids=[[1, 2], [3]], stop_token_ids=(7,))
    msg = decode(encode(PrefillRequest("r", [1, 2], p)), PrefillRequest)
    assert msg.params == p and msg.params.bad_words_ids == ((1, 2), (3,))
    raw = encode(PrefillRequest("r", [1], p)).replace('"min_tokens":2', '"min_tokens":99')
    with pytest.raises(ValueError, match="min_tokens"):
        decode(raw, PrefillRequest)


def test_resolve_eos_moves_the_eos_where_the_sampler_sees_it():
    eos = frozenset({2, 0})
    plain = SamplingParams(max_tokens=8)
    assert resolve_eos(plain, eos) is plain
    p = resolve_eos(SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(5,)), eos)
    assert p.stop_token_ids == (5, 0, 2) and p.ignore_eos
    p = resolve_eos(plain, eos, end_id=9)
    assert p.stop_token_ids == (9,) and p.ignore_eos
    ignoring = SamplingParams(max_tokens=8, min_tokens=3, ignore_eos=True)
    assert resolve_eos(ignoring, eos, end_id=9) is ignoring


# -- on the engine: verify rows see their draft prefix, so speculation stays lossless ------------
@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.4),
    SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True, frequency_penalty=0.7, min_tokens=6,
                   stop_token_ids=(2,)),
], ids=["greedy-penalties", "sampled-frequency-min-tokens"])
def test_speculation_with_processors_gives_the_same_tokens(smollm_fp32, smollm_tokenizer, one_thread, params):
    from backends.core.spec_decode import NgramDrafter
    from tests.helpers import assert_no_leaks, generate, make_engine
    from tests.test_spec_decode import REPETITIVE, run_spec
    prompt = smollm_tokenizer.encode(REPETITIVE)
    words = tuple(tuple(smollm_tokenizer.encode(w, add_special_tokens=False)) for w in (" Eve", " report"))
    params = SamplingParams(**{**params.__dict__, "bad_words_ids": words})
    expected = generate(make_engine(*smollm_fp32, num_kv_blocks=64), [prompt], params)[0]
    engine = make_engine(*smollm_fp32, num_kv_blocks=64, block_size=4)
    engine.add_request("r0", prompt, params)
    assert run_spec(engine, NgramDrafter())["r0"] == expected
    assert engine.spec_stats.num_draft_tokens > 0       # the verify path really ran
    assert_no_leaks(engine)


def test_greedy_tokens_are_argmax_ties_included():
    """The sampler's greedy pick (max(dim).indices, faster on CPU) is argmax's token, the first
    of equal maxima, in float32 and bfloat16."""
    from backends.core.sampling import greedy_tokens
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tied = torch.randint(0, 3, (16, 4099), generator=g).to(dtype)      # many equal maxima
        spread = torch.randn(16, 4099, generator=g).to(dtype)
        for x in (tied, spread):
            assert greedy_tokens(x) == x.argmax(dim=-1).tolist()
