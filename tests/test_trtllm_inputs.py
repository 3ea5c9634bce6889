"""TensorRT-LLM's ensemble inputs on `distserve`: parse and validation (backends/orchestrator/
inputs.py), the adapter's tensor reading ([1] and batched [1, 1] shapes) and error codes, and
penalties / min_length / bad_words / end_id / exclude_input_in_output through the in-process
prefill -> decode pipeline, equal to the offline engine."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from backends.core.sampling import MAX_SEED, SamplingParams
from backends.orchestrator.pipeline import Chunk, Orchestrator
from backends.serving.orchestrator_adapter import OrchestratorModel, read_inputs
from client.cli import parse_args, request_kwargs
from client.request import build_inputs
from deploy.contract import DISTSERVE_SPEC
from tests.test_orchestrator import Transport, _run, system  # noqa: F401 - `system` is a fixture

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def orch(smollm_tokenizer):
    return Orchestrator(smollm_tokenizer, 2048)


def test_trtllm_names_are_ours(orch, smollm_tokenizer):
    gen = orch.parse({"text_input": PROMPT, "max_tokens": 8, "stop_words": ["", "\n"],
                      "random_seed": 2**64 - 1, "min_length": 3, "pad_id": 0, "beam_width": 1,
                      "length_penalty": 1.0, "num_return_sequences": 1, "return_log_probs": False,
                      "return_context_logits": False, "return_generation_logits": False,
                      "return_perf_metrics": False, "bad_words": [""], "repetition_penalty": 1.2,
                      "presence_penalty": 0.5, "frequency_penalty": 0.25})
    p = gen.params
    assert p.stop == ("\n",) and p.seed == (2**64 - 1) % (MAX_SEED + 1) and p.min_tokens == 3
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, 0.25)
    assert p.bad_words_ids == () and p.needs_history
    # min_tokens must see the EOS: it moved into stop_token_ids, the engine's own check is off
    assert set(p.stop_token_ids) == set(smollm_tokenizer.stop_token_ids) and p.ignore_eos
    assert orch.parse({"text_input": PROMPT, "random_seed": 7}).params.seed == 7


def test_end_id_bad_words_and_echo(orch, smollm_tokenizer):
    p = orch.parse({"text_input": PROMPT, "end_id": 13}).params
    assert p.stop_token_ids == (13,) and p.ignore_eos and p.min_tokens == 0
    words = orch.parse({"text_input": PROMPT, "bad_words": ["Paris", " London"]}).params.bad_words_ids
    enc = lambda s: tuple(smollm_tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    assert set(words) == {enc("Paris"), enc(" Paris"), enc(" London")}
    assert orch.parse({"text_input": PROMPT, "exclude_input_in_output": False}).echo == PROMPT
    assert orch.parse({"text_input": PROMPT, "exclude_input_in_output": False, "stream": True}).echo == ""
    assert orch.parse({"text_input": PROMPT, "exclude_input_in_output": True}).echo == ""


@pytest.mark.parametrize("inputs, match", [
    ({"stop": ["a"], "stop_words": ["b"]}, "'stop' or 'stop_words'"),
    ({"seed": 1, "random_seed": 2}, "'seed' or 'random_seed'"),
    ({"min_tokens": 1, "min_length": 2}, "'min_tokens' or 'min_length'"),
    ({"beam_width": 2}, "beam_width 2 is not supported"),
    ({"length_penalty": 0.5}, "length_penalty 0.5 is not supported"),
    ({"num_return_sequences": 3}, "num_return_sequences"),
    ({"return_log_probs": True}, "return_log_probs True is not supported .*cum_log_probs"),
    ({"return_generation_logits": True}, "return_generation_logits"),
    ({"end_id": 10**7}, "end_id must be a token id"), ({"end_id": -1}, "end_id"),
    ({"max_tokens": 4, "min_length": 5}, "min_tokens must be an integer in \\[0, max_tokens=4\\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
])
def test_unsupported_or_bad_values_are_clear_errors(orch, inputs, match):
    with pytest.raises(ValueError, match=match):
        orch.parse({"text_input": PROMPT, **inputs})


class FakePb:
    """The bits of triton_python_backend_utils that read_inputs and _error use."""

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, array: np.ndarray) -> None:
            self.array = array

        def as_numpy(self) -> np.ndarray:
            return self.array

    @classmethod
    def get_input_tensor_by_name(cls, request: dict, name: str):
        return cls.Tensor(request[name]) if name in request else None


@pytest.mark.parametrize("batched", [False, True])
def test_read_inputs_takes_flat_and_batched_shapes(batched):
    arrays = {"text_input": np.array([PROMPT.encode()], dtype=np.object_),
              "max_tokens": np.array([8], dtype=np.int32), "random_seed": np.array([2**64 - 1], dtype=np.uint64),
              "bad_words": np.array([b"a", b"b"], dtype=np.object_), "beam_width": np.array([1], dtype=np.int32),
              "repetition_penalty": np.array([1.5], dtype=np.float32), "stream": np.array([False]),
              "input_ids": np.array([1, 2], dtype=np.int32)}
    if batched:                                 # what a TRT-LLM client sends: [1, 1], [1, n]
        arrays = {k: v.reshape(1, -1) for k, v in arrays.items()}
    values = read_inputs(FakePb, arrays)
    assert values == {"text_input": PROMPT, "max_tokens": 8, "random_seed": 2**64 - 1,
                      "bad_words": ["a", "b"], "beam_width": 1, "repetition_penalty": 1.5,
                      "stream": False, "input_ids": [1, 2]}
    with pytest.raises(ValueError, match="'max_tokens' must hold one element, got 2"):
        read_inputs(FakePb, {"max_tokens": np.array([[8], [9]], dtype=np.int32)})


def test_validation_errors_are_invalid_arg(orch):
    class Model(OrchestratorModel):
        pb = FakePb
    with pytest.raises(ValueError) as info:
        orch.parse({"text_input": PROMPT, "beam_width": 4})
    error = Model()._error(info.value)
    assert error.code == "INVALID_ARG" and "beam_width 4" in error.message


@pytest.mark.parametrize("batched", [False, True])
def test_the_batched_front_end_answers_with_a_batch_dimension(orch, batched):
    """distserve_batched (max_batch_size 1) runs the same adapter; its outputs are [1, n]."""
    class Pb(FakePb):
        Tensor = staticmethod(lambda name, array: (name, array.shape))
        InferenceResponse = staticmethod(dict)

    class Model(OrchestratorModel):
        pb = Pb
    model = Model()
    model.batched = batched
    gen = orch.parse({"text_input": PROMPT, "return_token_ids": True})
    shapes = model._response(Chunk("Paris", [1, 2, 3], "stop"), gen)
    expected = {"text_output": (1,), "token_ids": (3,), "finish_reason": (1,)}
    assert shapes == ({k: (1, *v) for k, v in expected.items()} if batched else expected)


def test_docs_list_every_input_with_its_dtype():
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text().split("## Outputs")[0]
    documented = {}
    for names, dtype in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| (\w+(?: \[-1\])?)", text, re.M):
        for name in re.findall(r"`(\w+)`", names):
            documented[name] = dtype
    spec = {t.name: t.dtype + (" [-1]" if t.dims == (-1,) else "") for t in DISTSERVE_SPEC.inputs}
    assert documented == spec


def test_cli_flags_reach_the_new_inputs():
    args = parse_args(["hi", "--bad-word", "a", "--bad-word", "b c", "--min-tokens", "3",
                       "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                       "--frequency-penalty", "-1"])
    values = build_inputs(**request_kwargs(args))
    assert values["bad_words"] == ["a", "b c"] and values["min_tokens"] == 3
    assert (values["repetition_penalty"], values["presence_penalty"], values["frequency_penalty"]) == (1.2, 0.5, -1.0)
    assert "bad_words" not in build_inputs(**request_kwargs(parse_args(["hi"])))


# -- through prefill and decode -----------------------------------------------------------------
def _assert_no_leak(prefill, decode) -> None:
    prefill.step()                              # frees the leases decode released
    assert prefill.engine.blocks.num_used == 0 and decode.engine.blocks.num_used == 0


def _offline(offline, params: SamplingParams, prompt=PROMPT):
    return offline.generate([prompt], params)[0]


def test_repetition_penalty_matches_offline_engine(system):  # noqa: F811
    prefill, decode, orch, offline = system
    inputs = {"text_input": PROMPT, "max_tokens": 24, "ignore_eos": True, "return_token_ids": True}
    plain = _run(orch, Transport(prefill, decode), inputs)[-1]
    chunks = _run(orch, Transport(prefill, decode), {**inputs, "repetition_penalty": 1.8,
                                                     "frequency_penalty": 0.4})
    expected = _offline(offline, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                repetition_penalty=1.8, frequency_penalty=0.4))
    assert chunks[-1].token_ids == expected.token_ids and chunks[-1].text == expected.text
    assert chunks[-1].token_ids != plain.token_ids
    _assert_no_leak(prefill, decode)


def test_min_length_holds_back_the_eos(system, smollm_tokenizer):  # noqa: F811
    prefill, decode, orch, offline = system
    messages = json.dumps([{"role": "user", "content": "Hi!"}])
    short = _run(orch, Transport(prefill, decode), {"messages": messages, "max_tokens": 40,
                                                    "return_token_ids": True})[-1]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20       # the model stops early
    longer = _run(orch, Transport(prefill, decode), {"messages": messages, "max_tokens": 40,
                                                     "min_length": 20, "return_token_ids": True})[-1]
    eos = smollm_tokenizer.stop_token_ids
    assert len(longer.token_ids) >= 20 and not eos & set(longer.token_ids[:20])
    assert longer.token_ids[:len(short.token_ids) - 1] == short.token_ids[:-1]   # same until the EOS
    expected = _offline(offline, SamplingParams(max_tokens=40, temperature=0, min_tokens=20),
                        json.loads(messages))
    assert longer.token_ids == expected.token_ids
    _assert_no_leak(prefill, decode)


def test_bad_words_end_id_and_echo(system, smollm_tokenizer):  # noqa: F811
    prefill, decode, orch, offline = system
    base = {"text_input": PROMPT, "max_tokens": 12, "ignore_eos": True, "return_token_ids": True}
    plain = _run(orch, Transport(prefill, decode), base)[-1]
    assert "Paris" in plain.text
    banned = _run(orch, Transport(prefill, decode), {**base, "bad_words": ["Paris"]})[-1]
    assert "Paris" not in banned.text and banned.finish_reason == "length"
    end = plain.token_ids[3]                    # stop there instead of at the model's EOS
    ended = _run(orch, Transport(prefill, decode), {**base, "ignore_eos": False, "end_id": end})[-1]
    assert ended.token_ids == plain.token_ids[:plain.token_ids.index(end) + 1]
    assert ended.finish_reason == "stop"
    echoed = _run(orch, Transport(prefill, decode), {**base, "exclude_input_in_output": False})
    assert len(echoed) == 1 and echoed[0].text == PROMPT + plain.text
    _assert_no_leak(prefill, decode)
