"""The real tritonserver, started by deploy/server.py, serving the echo fixture.

Observed Triton 2.51 facts these tests pin down:
- instances of a group with `count: 2` are named `<model>_<group>_<index>`: echo_0_0, echo_0_1;
- a stub inherits the server's affinity; an instance can pin itself (all its threads);
- HTTP `generate` on a decoupled model needs exactly one response (else status 200 with an
  "error" body); `generate_stream` takes any number; an error response is status 400 on both;
  unknown JSON keys are silently ignored;
- HTTP `infer` refuses decoupled models (use gRPC streaming or generate*);
- a non-decoupled model whose execute() returns None and answers later through the response
  sender serves concurrent requests on one instance (an `async def execute` would not: it
  overlaps only in decoupled models).
"""
from __future__ import annotations

import json
import os
import queue
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from deploy.runtime import parse_instance_name
from deploy.server import ServerError, TritonServer, check_ports_free
from .conftest import PROBE, echo_cores, http_post, make_echo_repository, start_server

ECHO_INSTANCES = {"echo_0_0", "echo_0_1"}
GENERATE, STREAM = "/v2/models/echo/generate", "/v2/models/echo/generate_stream"


def echo_inputs(text: str, repeat: int, grpc: bool = True) -> list:
    module = grpcclient if grpc else httpclient
    text_in = module.InferInput("text", [1], "BYTES")
    text_in.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    repeat_in = module.InferInput("repeat", [1], "INT32")
    repeat_in.set_data_from_numpy(np.array([repeat], dtype=np.int32))
    return [text_in, repeat_in]


def stream_echo(server: TritonServer, text: str, repeat: int, num_requests: int = 1) -> dict[str, list]:
    """Send `num_requests` echo requests on one gRPC stream; the responses of each, by id."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(num_requests):
            client.async_stream_infer("echo", echo_inputs(text, repeat), request_id=str(i),
                                      enable_empty_final_response=True)
        return _collect(results, num_requests)
    finally:
        client.stop_stream()
        client.close()


def _collect(results: queue.Queue, num_requests: int) -> dict[str, list]:
    responses: dict[str, list] = {str(i): [] for i in range(num_requests)}
    num_final = 0
    while num_final < num_requests:
        result, error = results.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            num_final += 1
        if response.outputs:
            responses[response.id].append(result)
    return responses


def test_grpc_stream_echoes_n_times_then_final(echo_server):
    (responses,) = stream_echo(echo_server, "héllo", repeat=3).values()
    assert [r.as_numpy("text")[0].decode() for r in responses] == ["héllo"] * 3
    assert [int(r.as_numpy("index")[0]) for r in responses] == [0, 1, 2]


def test_grpc_stream_zero_repeats_gets_only_final(echo_server):
    assert stream_echo(echo_server, "x", repeat=0) == {"0": []}


def test_http_generate_stream(echo_server):
    status, body = http_post(echo_server.http_url, STREAM, {"text": "hi", "repeat": 3})
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert [e["text"] for e in events] == ["hi"] * 3
    assert [e["index"] for e in events] == [0, 1, 2]


def test_http_generate_needs_exactly_one_response(echo_server):
    status, body = http_post(echo_server.http_url, GENERATE, {"text": "hi", "unknown_key": 1})
    assert status == 200 and json.loads(body)["text"] == "hi"     # unknown keys: silently ignored
    for repeat in (0, 2):                   # not exactly one response: status 200, an error body
        status, body = http_post(echo_server.http_url, GENERATE, {"text": "hi", "repeat": repeat})
        assert status == 200 and "exactly 1 response" in json.loads(body)["error"]


def test_http_error_response_is_400(echo_server):
    status, body = http_post(echo_server.http_url, GENERATE, {"text": "hi", "repeat": -1})
    assert status == 400 and json.loads(body) == {"error": "repeat must be >= 0, got -1"}
    status, body = http_post(echo_server.http_url, STREAM, {"text": "hi", "repeat": -1})
    assert status == 400 and body.strip() == 'data: {"error":"repeat must be >= 0, got -1"}'


def test_http_infer_refuses_decoupled_model(echo_server):
    client = httpclient.InferenceServerClient(echo_server.http_url)
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("echo", echo_inputs("hi", 1, grpc=False))
    client.close()


def _instances_seen(server: TritonServer, rounds: int = 10) -> dict[str, np.ndarray]:
    seen: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for (response,) in stream_echo(server, "x", repeat=1, num_requests=8).values():
            seen[response.as_numpy("instance")[0].decode()] = response
        if set(seen) == ECHO_INSTANCES:
            break
    return seen


def test_instance_names(echo_server):
    seen = _instances_seen(echo_server)
    assert set(seen) == ECHO_INSTANCES
    assert sorted(parse_instance_name(name)[1] for name in seen) == [0, 1]
    assert all(int(r.as_numpy("device_id")[0]) == 0 for r in seen.values())


def test_instances_pin_all_their_threads(echo_server):
    for name, response in _instances_seen(echo_server).items():
        cores = set(echo_cores()[parse_instance_name(name)[1]])
        assert set(response.as_numpy("affinity").tolist()) == cores
        stub = psutil.Process(int(response.as_numpy("pid")[0]))
        assert "triton_python_backend_stub" in stub.exe()
        assert all(os.sched_getaffinity(t.id) == cores for t in stub.threads())


def test_string_parameter_survives_triton_parsing(echo_server):
    (responses,) = stream_echo(echo_server, "x", repeat=1).values()
    assert responses[0].as_numpy("probe")[0].decode() == PROBE


def test_non_decoupled_model_answers_concurrent_requests_from_a_thread(echo_server):
    delay_in = httpclient.InferInput("delay_ms", [1], "INT32")
    delay_in.set_data_from_numpy(np.array([500], dtype=np.int32))
    client = httpclient.InferenceServerClient(echo_server.http_url, concurrency=4)
    begin = time.monotonic()
    pending = [client.async_infer("overlap", [delay_in]) for _ in range(4)]
    started = sorted(float(p.get_result().as_numpy("started")[0]) for p in pending)
    elapsed = time.monotonic() - begin
    client.close()
    assert started[-1] - started[0] < 0.4 and elapsed < 1.5      # serialized would take 2 s


def test_metrics_endpoint(echo_server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(echo_server.metrics_url, timeout=10) as response:
        assert 'nv_inference_request_success{model="echo"' in response.read().decode()


def test_stop_leaves_nothing_behind(tmp_path):
    repo = make_echo_repository(tmp_path / "repository")
    with start_server(repo, run_dir=tmp_path / "run") as server:
        stubs = psutil.Process(server.process.pid).children(recursive=True)
        assert len(stubs) == 3                             # echo x2, overlap
        assert list(Path("/dev/shm").glob(server.shm_prefix + "*"))
    assert server.stop() == 0                              # idempotent: the exit code again
    assert not [p.pid for p in stubs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))
    check_ports_free(server.host, [server.http_port, server.grpc_port, server.metrics_port])


def test_failed_load_names_the_log_and_the_error(tmp_path):
    repo = make_echo_repository(tmp_path / "repository")
    (repo / "echo" / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    with pytest.raises(ServerError, match="broken on purpose") as info:
        with start_server(repo, run_dir=tmp_path / "run", ready_timeout=60):
            pass
    assert str(tmp_path / "run" / "server.log") in str(info.value)
