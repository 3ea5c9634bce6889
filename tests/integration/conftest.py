"""Integration fixtures: a real tritonserver on 127.0.0.1 with free ports.

`start_server(repo_dir, **kw)` is the reusable piece: a context manager that starts
deploy.server.TritonServer on free loopback ports, waits until ready, and stops it (stop()
raises if any process of the server's group survives).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.core.control import send
from deploy.render import pbtxt_string, render_repository
from deploy.server import TritonServer, free_ports

ROOT = Path(__file__).resolve().parents[2]
ECHO_REPO = ROOT / "tests" / "fixtures" / "echo_repository"
# A string parameter with everything protobuf text format must escape.
PROBE = 'quote " backslash \\ newline \n tab \t unicode é 漢字 json {"a": [1, "b"]} ${x} {{y}}'


def echo_cores() -> list[list[int]]:
    """Core set per echo instance: disjoint when the host has two cores."""
    return [[0], [1]] if (os.cpu_count() or 1) >= 2 else [[0], [0]]


def http_post(http_url: str, path: str, body: dict) -> tuple[int, str]:
    """POST JSON to http://<http_url><path>; (status, body text), also for error statuses."""
    request = urllib.request.Request(f"http://{http_url}{path}", data=json.dumps(body).encode(),
                                     method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def instance_stats(server: TritonServer, instance_id: str) -> dict:
    """An engine instance's stats, through its control socket."""
    return send(server.control_dir / str(server.process.pid) / f"{instance_id}.sock", {"op": "stats"})


def wait_kv_free(server: TritonServer, instance_ids: tuple[str, ...], timeout: float = 10.0) -> None:
    """Wait until no instance holds KV blocks; fail naming what is still held."""
    deadline = time.monotonic() + timeout
    while True:
        used = {i: instance_stats(server, i)["kv_blocks_used"] for i in instance_ids}
        if not any(used.values()):
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {used}"
        time.sleep(0.2)


@contextlib.contextmanager
def start_server(repo_dir: str | Path, *, ready_timeout: float = 300.0, **kw) -> Iterator[TritonServer]:
    """A ready TritonServer for `repo_dir` on free loopback ports; stopped on exit."""
    http_port, grpc_port, metrics_port = free_ports(3)
    kw = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port, **kw}
    server = TritonServer(repo_dir, **kw)
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_deployment(deployment, tmp_path_factory, **kw) -> Iterator[TritonServer]:
    """`deployment` rendered into a fresh repository and served (start_server); stopped on exit."""
    repo = render_repository(deployment, tmp_path_factory.mktemp("repo") / "model_repository",
                             require_code=True)
    with start_server(repo, run_dir=tmp_path_factory.mktemp("run"), **kw) as server:
        yield server


def make_echo_repository(dest: Path) -> Path:
    """The echo fixture plus the parameters "probe" (escaped by us) and "cores"."""
    shutil.copytree(ECHO_REPO, dest, ignore=shutil.ignore_patterns("__pycache__"))
    parameters = {"probe": PROBE, "cores": json.dumps(echo_cores())}
    with open(dest / "echo" / "config.pbtxt", "a") as f:
        for key, value in parameters.items():
            f.write(f'parameters {{ key: "{key}" value {{ string_value: {pbtxt_string(value)} }} }}\n')
    return dest


@pytest.fixture(scope="session")
def echo_server(tmp_path_factory) -> Iterator[TritonServer]:
    repo = make_echo_repository(tmp_path_factory.mktemp("echo") / "repository")
    with start_server(repo, run_dir=tmp_path_factory.mktemp("echo_run")) as server:
        yield server


def replay_and_account(server: TritonServer, model: str, endpoint: str, num_good: int,
                       rate: float, seed: int = 0) -> list:
    """Replay `num_good` real chatbot requests (short caps) plus two the server must refuse
    (a prompt over the context, a token id outside the vocabulary) at `rate` rps through the
    benchmark client; check every request comes back in order, completed in full or reported
    failed with the server's reason; return the results."""
    from client.bench.pools import Request
    from client.bench.runner import replay
    from client.bench.workloads import LengthCaps, WorkloadSpec, arrival_times, load_workload
    w = load_workload(WorkloadSpec("chatbot", num_good, seed, LengthCaps(96, 12)))
    bad = [Request((1,) * 1100, 4, "too-long"), Request((1, 10 ** 6, 2), 4, "bad-token-id")]
    requests = list(w.requests[:num_good // 2]) + bad + list(w.requests[num_good // 2:])
    url = server.grpc_url if endpoint == "triton-grpc" else server.http_url
    results = replay(endpoint, url, model, requests, arrival_times(len(requests), rate, seed=seed),
                     timeout_s=120, progress=False)
    assert [r.index for r in results] == list(range(len(requests)))
    for req, r in zip(requests, results):
        if req.source in ("too-long", "bad-token-id"):
            assert not r.ok and r.error, (req.source, r)
            continue
        assert r.ok, (req.source, r.error)
        assert r.error is None and r.num_tokens == req.output_len and r.finish_reason == "length"
        assert r.ttft_s is not None and r.e2e_s >= r.ttft_s > 0
        assert r.server_timing and r.server_timing.output_tokens == req.output_len
    return results
