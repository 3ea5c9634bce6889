"""The OpenAI-compatible front end on the real server: a real tritonserver (the default
disaggregated deployment: prefill on core 0, decode on core 1), `python -m frontend` in front of
its gRPC port, and the official `openai` SDK (and raw HTTP) as the client. Outputs are compared
with what the project's own client gets from Triton's endpoint for the same request."""
from __future__ import annotations

import dataclasses
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from client import DistServeClient
from deploy.deployment import default_deployment
from deploy.render import render_repository
from deploy.server import free_ports
from tests.integration.conftest import ROOT, instance_stats, start_server, wait_kv_free

NAME = "smollm2-test"
MAX_MODEL_LEN = 1024
PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours."}]
INSTANCES = ("prefill-0", "decode-0")


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_path):
    # float32: the tests compare tokens exactly between requests that run in different batch
    # shapes and with or without a cached prefix; in bfloat16 those round a logit differently
    # and can flip an exact tie (docs/spec_decode.md), as the other exact-match tests avoid too
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), max_model_len=MAX_MODEL_LEN,
                                     default_max_tokens=32, dtype="float32")
    repo = render_repository(deployment, tmp_path_factory.mktemp("repo") / "model_repository",
                             require_code=True)
    with start_server(repo, run_dir=tmp_path_factory.mktemp("run")) as srv:
        yield srv


@pytest.fixture(scope="module")
def base_url(server):
    """`python -m frontend` on a free port, in front of the server's gRPC endpoint."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "frontend", "--triton", server.grpc_url,
                             "--port", str(port), "--served-model-name", NAME,
                             "--max-model-len", str(MAX_MODEL_LEN)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(url + "/models", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the front end did not answer within 60 s"
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)            # uvicorn stops, then re-raises the signal
        code, output = proc.wait(30), proc.stdout.read()
        assert code in (0, -signal.SIGTERM) and "Traceback" not in output, output


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def triton(server) -> DistServeClient:
    return DistServeClient(server.http_url, "http")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _streamed(chunks) -> tuple[str, str | None, dict | None]:
    """(text, finish reason, usage) of a streamed completion or chat completion."""
    texts, reason, usage = [], None, None
    for c in chunks:
        for choice in c.choices:
            texts.append(choice.text if hasattr(choice, "text") else choice.delta.content or "")
            reason = choice.finish_reason or reason
        usage = c.usage.model_dump(include=set(_usage(0, 0))) if c.usage else usage
    return "".join(texts), reason, usage


def test_models_lists_the_served_name(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_greedy_completions_equal_tritons_with_usage(oai, triton, smollm_tokenizer):
    expected = triton.generate(PROMPT, max_tokens=24, temperature=0.0, return_timing=True)
    usage = _usage(len(smollm_tokenizer.encode(PROMPT)), expected.timing.output_tokens)
    whole = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert whole.usage.model_dump(include=set(usage)) == usage and usage["completion_tokens"] == 24
    stream = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    assert _streamed(stream) == (expected.text, expected.finish_reason, usage)


def test_greedy_chat_equals_tritons_with_usage_also_concurrently(oai, triton, smollm_tokenizer):
    expected = triton.generate(messages=MESSAGES, max_tokens=32, temperature=0.0)
    template = smollm_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt_tokens = len(smollm_tokenizer.encode(template, add_special_tokens=False))
    whole = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=32, temperature=0)
    message = whole.choices[0].message
    assert (message.role, message.content, whole.choices[0].finish_reason) == \
        ("assistant", expected.text, expected.finish_reason)
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.total_tokens == prompt_tokens + whole.usage.completion_tokens

    def streamed(_):
        return _streamed(oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=32,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(streamed, range(4)))
    assert results == [(expected.text, expected.finish_reason, whole.usage.model_dump(
        include=set(_usage(0, 0))))] * 4


def test_seeded_sampling_equals_tritons(oai, triton):
    expected = triton.generate(PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    got = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9,
                                 seed=11)
    assert got.choices[0].text == expected.text


def test_stop_strings_cut_the_text_and_say_stop(oai, triton):
    text = triton.generate(PROMPT, max_tokens=24, temperature=0.0).text
    words = text.split()
    cut = text.index(words[2])                       # stop at the third word
    got = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=words[2])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (text[:cut], "stop")
    assert got.usage.completion_tokens < 24
    stream = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                    stop=["never-there", words[2]], stream=True)
    assert _streamed(stream)[:2] == (text[:cut], "stop")


def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=NAME, prompt="hello " * 2000, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and "context length" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, stream=True,
                                    n=2)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=5000)
    assert "too large" in info.value.message
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt=PROMPT)
    assert oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_disconnect_frees_the_request_on_both_instances(server, base_url, stream):
    host, port = base_url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        for _ in range(3):
            assert response.readline().startswith(b"data: {")
            response.readline()
    deadline = time.monotonic() + 30
    while not instance_stats(server, "decode-0")["kv_blocks_used"]:
        assert time.monotonic() < deadline, "the request never reached decode"
        time.sleep(0.1)
    conn.sock.shutdown(2)
    conn.close()
    wait_kv_free(server, INSTANCES, timeout=3)          # the whole request would take ~10 s
