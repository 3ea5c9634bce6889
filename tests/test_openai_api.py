"""frontend/ without Triton: request parsing, response shapes, errors, streaming and disconnects,
over real HTTP (uvicorn in a thread) with a scripted backend, the `openai` SDK as the client;
and frontend.backend against the fake Triton gRPC server (tests/fake_triton_grpc.py)."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from client import grpc_stream
from client.results import Chunk, DistServeError
from deploy.contract import Timing
from frontend import make_server, served_model_name
from frontend.app import create_app
from frontend.backend import TritonBackend
from frontend.errors import ApiError, backend_error
from frontend.parse import parse_chat, parse_completion
from frontend.server import FrontendServer
from tests.fake_triton_grpc import inputs, response, serve

MODEL = "tiny-model"
USER = [{"role": "user", "content": "Hi"}]


class ScriptedBackend:
    """Plays `script` for each request: a Chunk to send, an ApiError to raise, a number of
    seconds to wait. Records each request's values and how its stream ended."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        self.ends: list[str] = []                # "done", "closed" (closed before its end)
        self.ended = threading.Event()
        self.is_ready = True

    async def stream(self, values: dict[str, Any]) -> Any:
        self.requests.append(values)
        end = "closed"
        try:
            for step in self.script:
                if isinstance(step, Exception):
                    raise step
                if isinstance(step, (int, float)):
                    await asyncio.sleep(step)
                else:
                    yield step
            end = "done"
        finally:
            self.ends.append(end)
            self.ended.set()

    async def ready(self) -> bool:
        return self.is_ready

    async def close(self) -> None:
        pass


def final(text: str = "", reason: str = "length", prompt_tokens: int = 3, output_tokens: int = 4) -> Chunk:
    return Chunk(text, finish_reason=reason, timing=Timing(prompt_tokens=prompt_tokens,
                                                           output_tokens=output_tokens))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FrontendServer, ScriptedBackend]]:
    backend = ScriptedBackend()
    server = FrontendServer(create_app(backend, MODEL, max_model_len=2048), port=0).start()
    try:
        yield server, backend
    finally:
        server.stop()


@pytest.fixture
def api(served) -> tuple[openai.OpenAI, ScriptedBackend]:
    server, backend = served
    backend.script, backend.ends, backend.is_ready = [Chunk("Hel"), Chunk("lo"), final("!")], [], True
    backend.ended.clear()
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=10), backend


def post(server: FrontendServer, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- parsing ----------------------------------------------------------------------------------
def test_completion_fields_become_the_models_inputs():
    gen = parse_completion({"model": MODEL, "prompt": ["Say hi"], "max_tokens": 7, "temperature": 0.5,
                            "top_p": 0.9, "seed": 3, "stop": "\n", "top_k": -1, "ignore_eos": True,
                            "user": "u1", "logprobs": None, "n": 1, "echo": False,
                            "presence_penalty": 0, "metadata": {"x": 1}}, MODEL)
    assert gen.values == {"text_input": "Say hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                          "top_k": 0, "seed": 3, "stop": ["\n"], "ignore_eos": True,
                          "presence_penalty": 0.0, "return_timing": True, "stream": False}
    assert not gen.stream and not gen.include_usage
    penalized = parse_completion({"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1,
                                  "repetition_penalty": 1.2, "min_tokens": 4}, MODEL).values
    assert (penalized["presence_penalty"], penalized["frequency_penalty"],
            penalized["repetition_penalty"], penalized["min_tokens"]) == (0.5, -1.0, 1.2, 4)
    assert parse_completion({"prompt": [[1, 2, 3]]}, MODEL).values["input_ids"] == [1, 2, 3]
    streamed = parse_completion({"prompt": [5, 6], "stream": True, "stream_options": {"include_usage": True}}, MODEL)
    assert (streamed.values["input_ids"], streamed.stream, streamed.include_usage) == ([5, 6], True, True)


def test_chat_fields_become_the_models_inputs():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}, {"role": "user", "content": "c", "name": "x"}]
    gen = parse_chat({"messages": messages, "max_tokens": 9, "max_completion_tokens": 5,
                      "stop": ["x", "y"], "tool_choice": "none", "tools": [], "store": False}, MODEL)
    assert json.loads(gen.values["messages"]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}]
    assert (gen.values["max_tokens"], gen.values["stop"]) == (5, ["x", "y"])
    assert parse_chat({"messages": USER, "max_tokens": 9}, MODEL).values["max_tokens"] == 9


REFUSED = [
    ({"n": 2}, "n"), ({"logprobs": 2}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"suffix": "end"}, "suffix"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"), ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": None}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [1, -1]}, "prompt"), ({"prompt": [2**40]}, "prompt"),
]


@pytest.mark.parametrize("fields, param", REFUSED, ids=[p for _, p in REFUSED])
def test_a_bad_or_unsupported_completion_field_is_a_400_naming_it(fields, param):
    with pytest.raises(ApiError) as info:
        parse_completion({"model": MODEL, "prompt": "hi", **fields}, MODEL)
    assert (info.value.status, info.value.param) == (400, param)
    assert param.split(".")[0] in info.value.message


BAD_MESSAGES = [([], "messages"), ("hi", "messages"), (["hi"], "messages[0]"),
                ([{"role": "robot", "content": "x"}], "messages[0].role"),
                ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
                ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 "messages[0].content"),
                ([{"role": "user", "content": 5}], "messages[0].content")]


@pytest.mark.parametrize("messages, param", BAD_MESSAGES, ids=[p + str(i) for i, (_, p) in enumerate(BAD_MESSAGES)])
def test_bad_chat_messages_are_a_400_naming_them(messages, param):
    with pytest.raises(ApiError) as info:
        parse_chat({"messages": messages}, MODEL)
    assert (info.value.status, info.value.param) == (400, param)


def test_an_unknown_model_is_a_404_before_anything_else():
    with pytest.raises(ApiError) as info:
        parse_chat({"model": "gpt-4o", "messages": [], "n": 3}, MODEL)
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    assert served_model_name("models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_model_name("/ckpt/Qwen2-0.5B/") == "Qwen2-0.5B"


BACKEND_ERRORS = [
    (DistServeError("cannot reach Triton at x: refused", status="unreachable"), 503, "triton_unreachable"),
    (DistServeError("no response from Triton at x within 5 s", status="timeout"), 504, "timeout"),
    (DistServeError("overloaded: prefill-0 has 9 requests waiting for prefill"), 503, "overloaded"),
    (DistServeError("no decode instance can serve: decode-0 is dead"), 503, "model_not_ready"),
    (DistServeError("Request for unknown model: 'distserve' is not found"), 503, "model_not_ready"),
    (DistServeError("prompt has 3000 tokens; the context length is 2048"), 400, "context_length_exceeded"),
    (DistServeError("[request id: ab12] temperature must be a finite number >= 0"), 400, None),
    (DistServeError("request failed: decode-0 is dead (exit 9)"), 500, None),
]


@pytest.mark.parametrize("error, status, code", BACKEND_ERRORS, ids=[str(i) for i in range(len(BACKEND_ERRORS))])
def test_what_triton_says_becomes_the_right_status(error, status, code):
    api_error = backend_error(error)
    assert (api_error.status, api_error.code) == (status, code)
    assert not api_error.message.startswith("[request id")


# -- over HTTP ----------------------------------------------------------------------------------
def test_completion_and_chat_whole_responses(api, served):
    client, backend = api
    completion = client.completions.create(model=MODEL, prompt="Say", max_tokens=4)
    assert (completion.object, completion.model, completion.choices[0].text) == ("text_completion", MODEL, "Hello!")
    assert completion.id.startswith("cmpl-") and abs(completion.created - time.time()) < 60
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                             "completion_tokens_details": None, "prompt_tokens_details": None}
    backend.script = [final("Hi there.", "stop", 8, 3)]
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=5, seed=1)
    assert (chat.object, chat.choices[0].message.role, chat.choices[0].message.content) == \
        ("chat.completion", "assistant", "Hi there.")
    assert (chat.choices[0].finish_reason, chat.usage.total_tokens) == ("stop", 11)
    assert backend.requests[-1]["stream"] is False and backend.requests[-1]["seed"] == 1
    assert client.models.list().data[0].id == MODEL
    with urllib.request.urlopen(served[0].url + "/models/" + MODEL, timeout=5) as r:
        assert json.loads(r.read())["max_model_len"] == 2048


def test_streamed_chat_has_the_role_first_then_deltas_the_reason_and_usage(api):
    client, backend = api
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert backend.requests[-1]["stream"] is True
    chunks = list(client.completions.create(model=MODEL, prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello!" and chunks[-1].usage is None


def test_a_refusal_before_the_first_token_keeps_its_status_even_when_streaming(api):
    client, backend = api
    backend.script = [ApiError(503, "overloaded: try later", "service_unavailable_error", None, "overloaded")]
    with pytest.raises(openai.InternalServerError) as info:
        list(client.chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert info.value.status_code == 503 and info.value.code == "overloaded"
    backend.script = [ApiError(400, "prompt has 3000 tokens; the context length is 2048")]
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="long")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, logprobs=True)
    assert info.value.param == "logprobs" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER)


def test_an_error_mid_stream_is_a_last_error_event_then_done(api, served):
    _, backend = api
    backend.script = [Chunk("a"), ApiError(500, "request failed: decode-0 is dead", "server_error")]
    status, text = post(served[0], "/completions", {"prompt": "x", "stream": True})
    events = [line[6:] for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "request failed: decode-0 is dead"
    backend.script = [Chunk("a")]                       # the model never said why it ended
    status, body = post(served[0], "/completions", {"prompt": "x"})
    assert status == 500 and "without a finish reason" in body["error"]["message"]


def test_malformed_bodies_unknown_routes_and_health(api, served):
    server, backend = served
    status, body = post(server, "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert post(server, "/chat/completions", [1, 2])[0] == 400
    status, body = post(server, "/embeddings", {"input": "x"})
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=5) as r:
        assert r.status == 200
    backend.is_ready = False
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=5)
    assert info.value.code == 503


def _open(server: FrontendServer, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


@pytest.mark.parametrize("stream, when", [(True, "mid-stream"), (True, "queued"), (False, "queued")])
def test_a_client_that_goes_away_closes_the_models_stream(api, served, stream, when):
    _, backend = api
    backend.script = ([Chunk("a"), Chunk("b")] if when == "mid-stream" else []) + [30.0, final("z")]
    conn = _open(served[0], {"prompt": "x", "stream": stream})
    if when == "mid-stream":
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data:")
    else:
        time.sleep(0.3)                                  # the request waits for its first token
    conn.sock.shutdown(2)
    conn.close()
    assert backend.ended.wait(5) and backend.ends == ["closed"]


def test_the_port_is_bound_at_once_and_refused_when_taken(served):
    with pytest.raises(OSError):
        FrontendServer(create_app(ScriptedBackend(), MODEL), port=served[0].port)
    server = make_server("127.0.0.1:1", MODEL, port=0)
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/v1"
    server.stop()


# -- the Triton backend over gRPC (the fake Triton) -------------------------------------------------
def scripted(request: Any) -> list:
    prompt = inputs(request)["text_input"][0].decode()
    if prompt == "ok":
        return [response("a"), response("b", finish="length", timing={"prompt_tokens": 1, "output_tokens": 2},
                                         final=True)]
    if prompt == "busy":
        return [response(error="overloaded: prefill-0 has 5 requests waiting")]
    return [response("a"), 30.0]                          # "slow": open until cancelled


def _on_sdk_loop(coro: Any) -> Any:
    """Run on the SDK's grpc loop (one loop per process for grpc.aio; see client.grpc_stream)."""
    return asyncio.run_coroutine_threadsafe(coro, grpc_stream._shared_loop()).result(10)


def test_triton_backend_streams_maps_errors_and_cancels_what_it_leaves():
    async def first_then_leave(backend: TritonBackend) -> str:
        chunks = backend.stream({"text_input": "slow", "stream": True})
        text = (await anext(chunks)).text
        await chunks.aclose()
        return text

    async def collect(backend: TritonBackend, prompt: str) -> list[Chunk]:
        return [c async for c in backend.stream({"text_input": prompt, "stream": True})]

    with serve(scripted) as (url, triton):
        backend = TritonBackend(url, timeout=5)
        chunks = _on_sdk_loop(collect(backend, "ok"))
        assert [c.text for c in chunks] == ["a", "b"] and chunks[-1].timing.output_tokens == 2
        with pytest.raises(ApiError) as info:
            _on_sdk_loop(collect(backend, "busy"))
        assert (info.value.status, info.value.code) == (503, "overloaded")
        assert _on_sdk_loop(first_then_leave(backend)) == "a"
        deadline = time.monotonic() + 5
        while len(triton.cancelled) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(triton.cancelled) == 1
    with pytest.raises(ApiError) as info:
        _on_sdk_loop(collect(backend, "ok"))             # the server is gone
    assert (info.value.status, info.value.code) == (503, "triton_unreachable")
    _on_sdk_loop(backend.close())


def test_stopping_cancels_open_streams_quietly():
    backend = ScriptedBackend()
    backend.script = [Chunk("a"), 30.0, final("z")]
    server = FrontendServer(create_app(backend, MODEL), port=0, grace_s=0.3).start()
    reported: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = reported.append
    logging.getLogger("uvicorn.error").addHandler(handler)       # uvicorn's own logger
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "stream": True}))
        assert conn.getresponse().readline().startswith(b"data:")
        server.stop()
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert backend.ends == ["closed"]
    assert [r.getMessage() for r in reported] == ["Cancel 1 running task(s), timeout graceful shutdown exceeded"]
    with pytest.raises(OSError):
        http.client.HTTPConnection(server.host, server.port, timeout=2).request("GET", "/v1/models")


def test_serve_refuses_a_taken_openai_port_before_starting_triton(tmp_path, served, capsys):
    from deploy.__main__ import main as deploy_main
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    assert deploy_main(["serve", "--model", str(model), "--run-dir", str(tmp_path / "run"),
                        "--openai-port", str(served[0].port)]) == 2
    assert f"cannot serve the OpenAI API on 127.0.0.1:{served[0].port}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "server.log").exists()             # Triton never started
