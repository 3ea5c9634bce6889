"""TensorRT-LLM's ensemble contract on the real server: a tritonclient gRPC stream with TRT-LLM's
input names and dtypes, penalties / min_tokens / bad_words through the SDK, equal to the
offline engine; refusals (an unsupported value, a batched shape) are clear errors; the batched
front end (`distserve_batched`) takes TRT-LLM's [1, 1] shapes. One server, float32 so outputs
compare exactly with the offline engine."""
from __future__ import annotations

import dataclasses
import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backends.core.engine import EngineConfig
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.sampling import SamplingParams
from client import DistServeClient, DistServeError
from deploy.contract import DISTSERVE, DISTSERVE_BATCHED
from deploy.deployment import default_deployment
from tests.integration.conftest import http_post, serve_deployment, wait_kv_free

PROMPT = "The capital of France is"
HI = [{"role": "user", "content": "Hi!"}]          # the model answers in ~10 tokens, then EOS


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_path):
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024, default_max_tokens=32, batched_front_end=True)
    deployment = dataclasses.replace(
        deployment, prefill=dataclasses.replace(deployment.prefill, num_kv_blocks=128),
        decode=dataclasses.replace(deployment.decode, num_kv_blocks=128))
    with serve_deployment(deployment, tmp_path_factory) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(gguf_path):
    llm = LLM.from_path(str(gguf_path), EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=128)))
    return lambda prompt, params: llm.generate([prompt], params)[0]


def _tensor(name: str, value, dtype: str, batched: bool) -> grpcclient.InferInput:
    array = np.array(value if isinstance(value, list) else [value],
                     dtype=np.object_ if dtype == "BYTES" else None)
    if dtype != "BYTES":
        array = array.astype({"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": bool}[dtype])
    if batched:
        array = array.reshape(1, -1)
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def trtllm_stream(url: str, inputs: dict[str, tuple], batched: bool = False, model: str = DISTSERVE,
                  shapes: list | None = None) -> tuple[str, str | None]:
    """What tensorrtllm_backend's end-to-end gRPC client does: one streamed request with
    TRT-LLM's names and dtypes. Returns (text, error message or None); appends each response's
    output shapes ({name: shape}) to `shapes`."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, [_tensor(n, v, t, batched) for n, (v, t) in inputs.items()],
                                  enable_empty_final_response=True)
        text = ""
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return text, str(error)
            out = result.as_numpy("text_output")
            text += "" if out is None else out.reshape(-1)[0].decode()
            if shapes is not None and out is not None:
                shapes.append({o.name: list(o.shape) for o in result.get_response().outputs})
            if result.get_response().parameters["triton_final_response"].bool_param:
                return text, None
    finally:
        client.stop_stream()
        client.close()


TRTLLM_REQUEST = {                                   # name: (value, TRT-LLM's dtype)
    "text_input": (PROMPT, "BYTES"), "max_tokens": (16, "INT32"), "stream": (True, "BOOL"),
    "temperature": (0.0, "FP32"), "top_k": (1, "INT32"), "top_p": (1.0, "FP32"),
    "beam_width": (1, "INT32"), "length_penalty": (1.0, "FP32"), "num_return_sequences": (1, "INT32"),
    "random_seed": (2**64 - 1, "UINT64"), "end_id": (0, "INT32"), "pad_id": (0, "INT32"),
    "min_length": (16, "INT32"), "repetition_penalty": (1.5, "FP32"), "presence_penalty": (0.0, "FP32"),
    "frequency_penalty": (0.2, "FP32"), "bad_words": ([""], "BYTES"), "stop_words": ([""], "BYTES"),
    "exclude_input_in_output": (True, "BOOL"), "return_log_probs": (False, "BOOL"),
    "return_context_logits": (False, "BOOL"), "return_generation_logits": (False, "BOOL"),
    "return_perf_metrics": (False, "BOOL"),
}


def test_a_trtllm_grpc_request_matches_the_offline_engine(server, offline):
    text, error = trtllm_stream(server.grpc_url, TRTLLM_REQUEST)
    assert error is None
    penalized = offline(PROMPT, SamplingParams(max_tokens=16, temperature=0, min_tokens=16,
                                               repetition_penalty=1.5, frequency_penalty=0.2,
                                               stop_token_ids=(0,), ignore_eos=True))
    plain = offline(PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert text == penalized.text and text != plain.text
    # the same request, non-streamed, prompt not excluded: the prompt comes first (TRT-LLM's way)
    echoed, error = trtllm_stream(server.grpc_url, {**TRTLLM_REQUEST, "stream": (False, "BOOL"),
                                                    "exclude_input_in_output": (False, "BOOL")})
    assert error is None and echoed == PROMPT + penalized.text


def test_min_tokens_and_bad_words_through_the_sdk(server, offline):
    client = DistServeClient(server.grpc_url, "grpc")
    short = client.generate(messages=HI, max_tokens=40, return_token_ids=True)
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    longer = client.generate(messages=HI, max_tokens=40, min_tokens=24, return_token_ids=True)
    assert len(longer.token_ids) >= 24
    assert longer.token_ids == offline(HI, SamplingParams(max_tokens=40, temperature=0, min_tokens=24)).token_ids
    plain = client.generate(PROMPT, max_tokens=12, ignore_eos=True)
    assert "Paris" in plain.text
    http = DistServeClient(server.http_url, "http")
    banned = http.generate(PROMPT, max_tokens=12, ignore_eos=True, bad_words=["Paris", "France"])
    assert "Paris" not in banned.text and "France" not in banned.text and banned.text != plain.text
    wait_kv_free(server, ("prefill-0", "decode-0"))


def test_unsupported_values_and_batched_shapes_are_clear_errors(server):
    text, error = trtllm_stream(server.grpc_url, {**TRTLLM_REQUEST, "beam_width": (2, "INT32")})
    assert text == "" and "beam_width 2 is not supported" in error
    status, body = http_post(server.http_url, "/v2/models/distserve/generate",
                             {"text_input": PROMPT, "return_log_probs": True})
    assert status == 400 and "return_log_probs True is not supported" in json.loads(body)["error"]
    status, body = http_post(server.http_url, "/v2/models/distserve/generate",
                             {"text_input": PROMPT, "seed": 1, "random_seed": 2})
    assert status == 400 and "'seed' or 'random_seed'" in json.loads(body)["error"]
    with pytest.raises(DistServeError, match="repetition_penalty"):
        DistServeClient(server.grpc_url, "grpc").generate(PROMPT, repetition_penalty=0.0)
    # TRT-LLM's clients send [1, 1] (its ensemble has max_batch_size > 0); ours has 0: Triton
    # refuses the shape before the model sees it (docs/api.md, "Shapes")
    text, error = trtllm_stream(server.grpc_url, {"text_input": (PROMPT, "BYTES"), "max_tokens": (4, "INT32")},
                                batched=True)
    assert "unexpected shape for input" in error and "Expected [1], got [1,1]" in error
    wait_kv_free(server, ("prefill-0", "decode-0"))



def test_the_batched_front_end_takes_trtllm_shapes(server):
    """distserve_batched (batched_front_end): TRT-LLM's shapes ([1, 1], lists [1, n]) in and out,
    the same answer as distserve's; it refuses the flat shapes, as distserve the batched ones."""
    request = {**TRTLLM_REQUEST, "return_token_ids": (True, "BOOL")}
    flat_shapes, batched_shapes = [], []
    flat, error = trtllm_stream(server.grpc_url, request, shapes=flat_shapes)
    assert error is None
    text, error = trtllm_stream(server.grpc_url, {**request, "bad_words": (["", "Lyon"], "BYTES")},
                                batched=True, model=DISTSERVE_BATCHED, shapes=batched_shapes)
    assert error is None and text == flat
    assert [s["text_output"] for s in flat_shapes] == [[1]] * len(flat_shapes)
    assert [s["text_output"] for s in batched_shapes] == [[1, 1]] * len(batched_shapes)
    assert [s["token_ids"] for s in batched_shapes] == [[1, n] for [n] in (s["token_ids"] for s in flat_shapes)]
    text, error = trtllm_stream(server.grpc_url, {"text_input": (PROMPT, "BYTES"), "max_tokens": (4, "INT32")},
                                model=DISTSERVE_BATCHED)
    assert "unexpected shape for input" in error and "Expected [-1,1], got [1]" in error
    # Triton's generate builds the batched tensors from JSON scalars
    body = {"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True}
    answers = [http_post(server.http_url, f"/v2/models/{model}/generate", body)
               for model in (DISTSERVE, DISTSERVE_BATCHED)]
    assert [status for status, _ in answers] == [200, 200]
    assert json.loads(answers[1][1])["text_output"] == json.loads(answers[0][1])["text_output"]
    wait_kv_free(server, ("prefill-0", "decode-0"))
