"""client/ without Triton: SSE, request tensors, outputs, client timing, HTTP against a stdlib
server, gRPC against a fake Triton gRPC server (tests/fake_triton_grpc.py), and the CLI when
nothing listens."""
from __future__ import annotations

import asyncio
import gc
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client import Chunk, DistServeClient, DistServeError, grpc_stream
from client.cli import format_timing
from client.grpc_stream import GrpcChannel
from client.http_stream import _status_error, split_url
from client.request import build_inputs, grpc_request
from client.results import Completion, chunk_from_arrays, chunk_from_json
from client.sdk import Stream
from client.sse import iter_sse_data, iter_sse_events
from client.timer import ClientTimer
from deploy.contract import DISTSERVE_SPEC, TRTLLM_INPUTS, Timing
from tests.fake_triton_grpc import inputs, response, serve

ROOT = Path(__file__).resolve().parent.parent
ALL_ARGS = dict(max_tokens=8, temperature=0.5, top_p=0.9, top_k=4, seed=7, stop=["\n", "END"], ignore_eos=True,
                return_token_ids=True, return_timing=True, slo_ttft_s=1.5, slo_tpot_s=0.05, stream=True,
                min_tokens=2, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                bad_words=["x", "y z"])


# -- SSE ------------------------------------------------------------------------------------
def test_sse_events_multiline_comments_blanks_and_crlf():
    lines = [b": keep-alive\n", b"\n", b"\n", b'data: {"text_output": "a"}\r\n', b"\r\n",
             "event: message\n", "id: 3\n", 'data:{"text_output":\n', 'data: "b c"}\n', "\n",
             b"data: \n", b"\n", b'data: {"text_output": "\xc3\xa9"}\n']          # no final blank
    assert list(iter_sse_data(lines)) == ['{"text_output": "a"}', '{"text_output":\n"b c"}', "",
                                          '{"text_output": "é"}']
    assert [e["text_output"] for e in iter_sse_events(lines)] == ["a", "b c", "é"]


def test_sse_error_payload_raises_with_the_servers_message():
    events = iter_sse_events(['data: {"text_output": "x"}', "", 'data: {"error": "boom: bad"}', ""])
    assert next(events) == {"text_output": "x"}
    with pytest.raises(DistServeError, match="^boom: bad$"):
        next(events)
    with pytest.raises(DistServeError, match="malformed"):
        list(iter_sse_events(["data: {not json", ""]))


def test_error_status_bodies():
    e = _status_error(400, 'data: {"error":"max_tokens must be positive"}\n\n')
    assert (e.message, e.status) == ("max_tokens must be positive", 400)
    assert _status_error(404, '{"error": "unknown model"}').message == "unknown model"
    assert _status_error(502, "<html>bad gateway</html>").message == "HTTP 502: <html>bad gateway</html>"


# -- outputs --------------------------------------------------------------------------------
def test_chunks_from_json_scalars_and_arrays_and_from_numpy():
    # Triton writes a one-element output as a scalar, anything else as an array.
    one = chunk_from_json({"text_output": "a", "token_ids": 29, "model_name": "distserve"})
    assert one == Chunk("a", [29], None, None)
    last = chunk_from_json({"text_output": ["b", "c"], "token_ids": [1, 2], "finish_reason": "stop",
                            "timing": json.dumps({"ttft_s": 0.1})})
    assert last == Chunk("bc", [1, 2], "stop", Timing(ttft_s=0.1))
    assert chunk_from_json({"text_output": "", "token_ids": 0}) == Chunk("", [0])
    with pytest.raises(DistServeError, match="nope"):
        chunk_from_json({"error": "nope"})
    arrays = {"text_output": np.array([b"h\xc3\xa9"], dtype=object),
              "token_ids": np.array([5, 6], dtype=np.int32), "finish_reason": None,
              "timing": np.array([b'{"e2e_s": 1.5}'], dtype=object)}
    assert chunk_from_arrays(arrays) == Chunk("hé", [5, 6], None, Timing(e2e_s=1.5))
    assert chunk_from_arrays({}) == Chunk()
    assert chunk_from_arrays({"token_ids": np.array([], dtype=np.int32),
                              "finish_reason": np.array([], dtype=object)}) == Chunk()


def test_timing_is_typed_and_checked():
    route = {"kind": "local", "decode": "decode-0"}
    timing = {"prompt_tokens": 3, "output_tokens": 2, "ttft_s": 0.5, "kv_bytes": 64, "future": "x", "route": route}
    chunk = chunk_from_json({"finish_reason": ["length"], "timing": [json.dumps(timing)]})
    assert chunk.timing == Timing(prompt_tokens=3, output_tokens=2, ttft_s=0.5, kv_bytes=64, route=route)
    for bad, reason in (('{"ttft_s": "0.5"}', "malformed timing: timing field 'ttft_s'"),
                        ('{"kv_bytes": 1.5}', "malformed timing: timing field 'kv_bytes'"),
                        ('{"route": "local"}', "malformed timing: timing field 'route'"),
                        ("[1]", "malformed timing: timing must be a JSON object"),
                        ("{oops", "not JSON")):
        with pytest.raises(DistServeError, match=reason):
            chunk_from_json({"timing": bad})
    completion = Completion("x", [], "length", Timing(ttft_s=0.1, tpot_s=0.02, kv_bytes=64),
                            ttft_s=0.2, e2e_s=1.0)
    assert format_timing(completion).splitlines()[1].startswith("server: ttft 100.0 ms  tpot 20.0 ms")
    assert "kv transfer - (64 B)" in format_timing(completion)
    assert len(format_timing(Completion("x", [], None, None, None, 1.0)).splitlines()) == 1


# -- inputs ---------------------------------------------------------------------------------
def test_build_inputs_omits_unset_and_checks_types():
    assert build_inputs("hi") == {"text_input": "hi", "stream": False}
    values = build_inputs(messages=[{"role": "user", "content": "é"}], stop="x", temperature=1)
    assert json.loads(values["messages"]) == [{"role": "user", "content": "é"}]
    assert values["stop"] == ["x"] and values["temperature"] == 1.0
    for bad in (dict(max_tokens=True), dict(max_tokens=1.5), dict(temperature="0"),
                dict(stop=["a", 1]), dict(input_ids="12"), dict(messages=["hi"]),
                dict(ignore_eos=1), dict(bad_words=[b"x"]), dict(min_tokens=1.0),
                dict(repetition_penalty="1")):
        with pytest.raises(TypeError):
            build_inputs("hi", **bad)


def test_grpc_request_follows_the_contract():
    values = build_inputs("héllo", input_ids=[1, 2, 3], **ALL_ARGS)
    request = grpc_request("distserve", values, "r1")
    assert (request.model_name, request.id) == ("distserve", "r1")
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    tensors = {t.name: t for t in request.inputs}
    assert list(tensors) == list(values)
    assert set(tensors) == {s.name for s in DISTSERVE_SPEC.inputs} - {"messages", *TRTLLM_INPUTS}
    for spec in DISTSERVE_SPEC.inputs:
        if spec.name in tensors:
            assert tensors[spec.name].datatype == spec.dtype
            assert list(tensors[spec.name].shape) == ([len(values[spec.name])] if spec.dims == (-1,) else [1])
    assert (tensors["seed"].datatype, tensors["temperature"].datatype) == ("INT64", "FP32")
    arrays = inputs(request)
    assert arrays["stop"].tolist() == [b"\n", b"END"]
    assert arrays["text_input"].tolist() == ["héllo".encode()]
    assert arrays["input_ids"].tolist() == [1, 2, 3] and arrays["max_tokens"].tolist() == [8]
    assert arrays["stream"].tolist() == [True] and arrays["top_p"].tolist() == [pytest.approx(0.9)]
    assert inputs(grpc_request("m", {"input_ids": []}, "r2"))["input_ids"].tolist() == []
    assert split_url("http://localhost:9000/") == ("localhost", 9000)
    assert split_url("example.org") == ("example.org", 8000)


# -- client-side timing ---------------------------------------------------------------------
class FakeClock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


class ListTransport:
    """Yields chunks, advancing the fake clock before each one by the given step."""

    def __init__(self, clock: FakeClock, steps_and_chunks: list[tuple[float, Chunk]]) -> None:
        self.clock, self.items, self.num_cancels = clock, steps_and_chunks, 0

    def __iter__(self):
        for step, chunk in self.items:
            self.clock.now += step
            yield chunk

    def cancel(self) -> None:
        self.num_cancels += 1


def test_ttft_tpot_e2e_on_a_fake_clock():
    clock = FakeClock()
    items = [(0.5, Chunk("")), (0.25, Chunk("a")), (0.1, Chunk("b")), (0.3, Chunk("", [7])),
             (0.2, Chunk("c", finish_reason="length", timing=Timing(tpot_s=0.2)))]
    transport = ListTransport(clock, items)
    stream = Stream(transport, ClientTimer(clock))
    completion = stream.collect()
    assert completion.text == "abc" and completion.token_ids == [7]
    assert (completion.finish_reason, completion.timing) == ("length", Timing(tpot_s=0.2))
    assert completion.ttft_s == pytest.approx(0.75)          # the empty first chunk does not count
    assert completion.tpot_s == pytest.approx((0.1 + 0.3 + 0.2) / 3)   # 4 token chunks
    assert completion.e2e_s == pytest.approx(1.35) and completion.num_chunks == 5
    stream.close()
    assert transport.num_cancels == 1
    timer = ClientTimer(clock)                               # one token chunk: no TPOT
    clock.now += 2.0
    timer.observe(has_tokens=True)
    timer.finish()
    assert (timer.ttft_s, timer.tpot_s, timer.e2e_s) == (2.0, None, 2.0)
    assert ClientTimer(clock).ttft_s is None


# -- HTTP against a stdlib server -----------------------------------------------------------
class SSEHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append({"path": self.path, **body})
        status, lines, delay = self.server.script[body["text_input"]]
        self.send_response(status)
        self.send_header("Connection", "close")
        self.end_headers()
        for line in lines:
            self.wfile.write(line.encode())
            self.wfile.flush()
        time.sleep(delay)

    def log_message(self, *args) -> None:          # quiet
        pass


@pytest.fixture
def sse_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SSEHandler)
    server.daemon_threads = True
    server.script = {
        "ok": (200, [": ping\n\n", 'data: {"text_output":"a","token_ids":1}\n\n',
                     'data: {"text_output":"b","token_ids":2,"finish_reason":"stop"}\n\n'], 0),
        "bad": (400, ['data: {"error":"max_tokens must be positive"}\n\n'], 0),
        "mid": (200, ['data: {"text_output":"a"}\n\n', 'data: {"error":"decode failed"}\n\n'], 0),
        "slow": (200, ['data: {"text_output":"a"}\n\n'], 3.0),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_stream_and_errors(sse_server):
    client = DistServeClient(sse_server, timeout=0.5)
    stream = client.stream("ok", max_tokens=2, return_token_ids=True)
    assert [c.text for c in stream] == ["a", "b"]
    assert (stream.token_ids, stream.finish_reason) == ([1, 2], "stop")
    assert SSEHandler.bodies[-1] == {"path": "/v2/models/distserve/generate_stream", "text_input": "ok",
                                     "max_tokens": 2, "return_token_ids": True, "stream": True}
    with pytest.raises(DistServeError, match="^max_tokens must be positive$") as info:
        client.generate("bad")
    assert info.value.status == 400
    stream = client.stream("mid")
    assert next(stream).text == "a"
    with pytest.raises(DistServeError, match="^decode failed$"):
        next(stream)
    start = time.perf_counter()
    with pytest.raises(DistServeError, match="within 0.5 s") as info:
        list(client.stream("slow"))
    assert info.value.status == "timeout" and time.perf_counter() - start < 2.0


def test_http_cancel_from_another_thread_ends_the_stream(sse_server):
    stream = DistServeClient(sse_server, timeout=10).stream("slow")
    assert next(stream).text == "a"
    threading.Timer(0.2, stream.cancel).start()
    start = time.perf_counter()
    assert list(stream) == [] and time.perf_counter() - start < 2.0


# -- gRPC against a fake Triton ---------------------------------------------------------------
def grpc_leftovers(wait_s: float = 2.0) -> list:
    """What the SDK's gRPC streams left behind: threads besides its one loop's, open grpc.aio
    channels, and tasks still on the loop (grpc's own, after a cancel, get `wait_s` to end)."""
    from grpc.aio._channel import Channel
    threads = [t.name for t in threading.enumerate() if t.name.startswith("distserve-grpc")]
    if threads != ["distserve-grpc loop"]:
        return threads

    async def tasks() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    deadline = time.perf_counter() + wait_s
    while ((left := asyncio.run_coroutine_threadsafe(tasks(), grpc_stream._shared_loop()).result())
           and time.perf_counter() < deadline):
        time.sleep(0.01)
    gc.collect()
    return left + [c for c in gc.get_objects() if type(c) is Channel and not c._channel.closed()]


def scripted(request) -> list:
    """The first prompt's text picks the behaviour."""
    timing = {"ttft_s": 0.01, "output_tokens": 3}
    return {"ok": [response("a", 1), response("b", 2), response("", [], "length", timing, final=True)],
            "flags": [response("a", 1), response(final=True)],       # final by flags alone
            "bad": [response(error="give exactly one of text_input, messages or input_ids")],
            "mid": [response("a", 1), response(error="decode failed")],
            "slow": [response("a", 1), 10.0],
            "open": [response("a", 1)]}[inputs(request)["text_input"][0].decode()]


def test_grpc_stream_until_the_final_flag():
    with serve(scripted) as (url, triton):
        client = DistServeClient(f"grpc://{url}/", "grpc", timeout=5.0)
        stream = client.stream("ok", max_tokens=3, return_token_ids=True, return_timing=True)
        assert [c.text for c in stream] == ["a", "b", ""]
        assert (stream.token_ids, stream.finish_reason) == ([1, 2], "length")
        assert stream.timing == Timing(ttft_s=0.01, output_tokens=3)
        request = triton.requests[-1]
        assert request.parameters["triton_enable_empty_final_response"].bool_param
        assert inputs(request)["max_tokens"].tolist() == [3] and request.id
        completion = client.generate("flags")
        assert (completion.text, completion.num_chunks, completion.timing) == ("a", 1, None)
        assert triton.cancelled == [] and grpc_leftovers() == []


def test_grpc_errors_timeout_and_cancel():
    with serve(scripted) as (url, triton):
        client = DistServeClient(url, "grpc", timeout=0.3)
        with pytest.raises(DistServeError, match="^give exactly one") as info:
            client.generate("bad")
        assert info.value.status is None
        stream = client.stream("mid")
        assert next(stream).text == "a"
        with pytest.raises(DistServeError, match="^decode failed$"):
            next(stream)
        with pytest.raises(DistServeError, match="ended the stream before the request's final"):
            client.generate("open")
        start = time.perf_counter()
        with pytest.raises(DistServeError, match=f"^no response from Triton at {url} within 0.3 s$") as info:
            list(client.stream("slow"))
        assert info.value.status == "timeout" and time.perf_counter() - start < 2.0
        stream = DistServeClient(url, "grpc", timeout=10.0).stream("slow")
        assert next(stream).text == "a"
        threading.Timer(0.2, stream.cancel).start()
        start = time.perf_counter()
        assert list(stream) == [] and time.perf_counter() - start < 2.0   # the cancel ends it quietly
        DistServeClient(url, "grpc").stream("slow").close()               # never read: closed too
        with DistServeClient(url, "grpc").stream("slow") as stream:
            next(stream)
        slow = {r.id for r in triton.requests if inputs(r)["text_input"][0] == b"slow"}
        deadline = time.perf_counter() + 2.0
        while len(triton.cancelled) < len(slow) and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert len(slow) >= 3 and set(triton.cancelled) == slow   # Triton would cancel them all
        assert grpc_leftovers() == []


def test_grpc_streams_in_parallel_threads_end_quietly(capfd, caplog):
    """Streams in several threads at once, ending in every way (an error response, an error
    after a chunk, the final response, the server's early end, a cancel): each one's result, and
    nothing reported: to the SDK loop's exception handler, or by any other loop's (the default
    one logs to the "asyncio" logger; that is stderr where logging is not set up). With a loop
    per stream, grpc.aio handed late completions to a closed one: "Exception in callback
    PollerCompletionQueue._handle_events ... RuntimeError: Event loop is closed"."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    reported: list[dict] = []
    grpc_stream._shared_loop().set_exception_handler(lambda _, context: reported.append(context))
    failures: list[BaseException] = []

    def requests(client: DistServeClient) -> None:
        try:
            for _ in range(25):
                with pytest.raises(DistServeError, match="^give exactly one"):
                    client.generate("bad")
                stream = client.stream("mid")
                assert next(stream).text == "a"
                with pytest.raises(DistServeError, match="^decode failed$"):
                    next(stream)
                assert client.generate("ok").text == "ab"
                with pytest.raises(DistServeError, match="ended the stream before"):
                    client.generate("open")
                with client.stream("slow") as stream:               # left early: cancelled
                    assert next(stream).text == "a"
        except BaseException as e:                                  # noqa: BLE001 - reported below
            failures.append(e)

    try:
        with serve(scripted) as (url, triton):
            threads = [threading.Thread(target=requests,
                                        args=(DistServeClient(url, "grpc", timeout=5.0),))
                       for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60.0)
            assert failures == [] and not any(t.is_alive() for t in threads)
            assert grpc_leftovers() == []
    finally:
        grpc_stream._shared_loop().set_exception_handler(None)
    assert reported == []
    stderr = capfd.readouterr().err
    assert "Event loop is closed" not in stderr and "Traceback" not in stderr, stderr
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_grpc_channel_leaving_early_cancels_on_the_server():
    async def leave_after_one(url: str, triton) -> None:
        async with GrpcChannel(url) as channel:         # (closing it would cancel too)
            chunks = channel.stream("distserve", build_inputs("slow", stream=True), timeout=5.0)
            assert (await chunks.__anext__()).text == "a"
            await chunks.aclose()                         # as `break` in an `async for` would
            for _ in range(200):
                if triton.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert triton.cancelled == [triton.requests[-1].id]
    with serve(scripted) as (url, triton):
        asyncio.run(leave_after_one(url, triton))


# -- CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_reports_an_unreachable_server(protocol):
    with socket.socket() as sock:                  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "client", "hi", "--url", f"127.0.0.1:{port}",
                           "--protocol", protocol], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"error: cannot reach Triton at 127.0.0.1:{port}: connection refused"
                           " — is ./build.sh serve running?\n")


def test_cli_stop_repeats_and_never_swallows_the_prompt():
    from client.cli import parse_args
    args = parse_args(["--stop", "\n\n", "--stop", "END", "Write a haiku"])
    assert args.stop == ["\n\n", "END"] and args.prompt == "Write a haiku"
    assert parse_args(["Hi"]).stop is None
