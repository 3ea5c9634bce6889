"""`python -m deploy serve` end to end, with stand-in adapters in place of the real ones.

The stand-ins load no model: each pins itself with deploy.runtime.init_instance (reading
the deployment from its rendered config, as the real adapters do) and answers one JSON
document naming its model, instance and CPU affinity. That checks the rendered configs
against the real server, the contract's inputs, the per-phase pinning, the OpenAI-compatible
front end the launcher serves beside Triton, and that SIGTERM stops the foreground launcher and
everything it started.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.contract import COLOCATED, DISTSERVE, DISTSERVE_COLOCATED, instance_model
from deploy.deployment import colocated_deployment
from deploy.render import ENGINE_ADAPTER
from deploy.server import free_ports

from .conftest import ROOT, http_post

STAND_IN = '''
import json, os
import numpy as np
import triton_python_backend_utils as pb_utils
from deploy.contract import COLOCATED, model_instance
from deploy.runtime import init_instance


class TritonPythonModel:
    def initialize(self, args):
        self.name, self.instance = args["model_name"], args["model_instance_name"]
        if not self.name.startswith("distserve"):
            init_instance(args, COLOCATED if self.name == COLOCATED else model_instance(self.name)[0])

    def execute(self, requests):
        front = self.name.startswith("distserve")
        output = "text_output" if front else "response"
        for request in requests:
            answer = {"model": self.name, "instance": self.instance,
                      "affinity": sorted(os.sched_getaffinity(0)),
                      "inputs": sorted(t.name() for t in request.inputs())}
            tensors = [pb_utils.Tensor(output, np.array([json.dumps(answer).encode()], dtype=np.object_))]
            if front:
                tensors.append(pb_utils.Tensor("finish_reason", np.array([b"stop"], dtype=np.object_)))
            request.get_response_sender().send(pb_utils.InferenceResponse(tensors),
                                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def stand_in_repository(dest: Path) -> Path:
    for model in (DISTSERVE, DISTSERVE_COLOCATED, COLOCATED):
        (dest / model / "1").mkdir(parents=True)
        (dest / model / "1" / "model.py").write_text(STAND_IN)
    (dest / ENGINE_ADAPTER).write_text(STAND_IN)        # every prefill / decode instance's model
    return dest


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return lines
    pytest.fail(f"no {needle!r} from serve (exit {proc.poll()}):\n{''.join(lines)}")


@pytest.fixture
def serving(tmp_path):
    with serve(tmp_path) as running:
        yield running


@contextlib.contextmanager
def serve(tmp_path: Path, *extra: str):
    """A `python -m deploy serve` process on free ports; yields (process, http_url, openai_url),
    the latter two "127.0.0.1:port" (Triton's HTTP endpoint, the OpenAI-compatible API)."""
    http_port, grpc_port, metrics_port, openai_port = free_ports(4)
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"")                    # serve only checks that it exists
    cmd = [sys.executable, "-m", "deploy", "serve", "--model", str(model_file),
           "--src", str(stand_in_repository(tmp_path / "src")), "--run-dir", str(tmp_path / "run"),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--metrics-port", str(metrics_port), "--openai-port", str(openai_port),
           "--ready-timeout", "120", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "DistServe is ready", timeout=150)
        yield proc, f"127.0.0.1:{http_port}", f"127.0.0.1:{openai_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def generate(http_url: str, model: str, body: dict) -> dict:
    status, text = http_post(http_url, f"/v2/models/{model}/generate", body)
    assert status == 200, text
    answer = json.loads(text)
    return json.loads(answer["text_output" if model.startswith(DISTSERVE) else "response"])


def openai_answer(openai_url: str, body: dict) -> tuple[dict, dict]:
    """(the stand-in's answer, the OpenAI response) of a chat completion through the front end."""
    status, text = http_post(openai_url, "/v1/chat/completions",
                             {"model": "model", "messages": [{"role": "user", "content": "Hi"}], **body})
    assert status == 200, text
    response = json.loads(text)
    return json.loads(response["choices"][0]["message"]["content"]), response


def test_serve_renders_pins_and_stops_cleanly(serving):
    proc, http_url, openai_url = serving
    body = {"text_input": "Hello", "max_tokens": 8, "stream": False, "temperature": 0.0,
            "top_p": 1.0, "top_k": 0, "seed": 1, "stop": ["\n"], "ignore_eos": False,
            "return_token_ids": True, "return_timing": True}
    answer = generate(http_url, DISTSERVE, body)
    assert answer["inputs"] == sorted(body)              # every contract input is accepted
    cores = [[0], [1]] if (os.cpu_count() or 1) >= 2 else [[0], [0]]
    for instance, expected in (("prefill-0", cores[0]), ("decode-0", cores[1])):
        model = instance_model(instance)                  # prefill_0, decode_0
        answer = generate(http_url, model, {"request": "{}"})
        assert (answer["instance"], answer["affinity"]) == (f"{model}_0_0", expected)

    answer, response = openai_answer(openai_url, {"max_tokens": 8, "seed": 3})
    assert (answer["model"], response["model"], response["choices"][0]["finish_reason"]) == \
        (DISTSERVE, "model", "stop")                      # served as the model file's stem
    assert answer["inputs"] == ["max_tokens", "messages", "return_timing", "seed", "stream"]

    server_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(server_pids) == 4                          # tritonserver + three stubs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    output = proc.stdout.read()
    assert "stopping tritonserver" in output and f"OpenAI-compatible API http://{openai_url}/v1" in output
    with pytest.raises(OSError):                          # the front end stopped with the server
        socket.create_connection(tuple(openai_url.split(":")), timeout=5).close()
    assert not [pid for pid in server_pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_serve_the_colocated_baseline_on_the_same_cores(tmp_path):
    with serve(tmp_path, "--baseline", "chunked") as (proc, http_url, openai_url):
        answer = generate(http_url, DISTSERVE_COLOCATED, {"text_input": "Hello", "max_tokens": 8})
        assert answer["model"] == DISTSERVE_COLOCATED
        assert openai_answer(openai_url, {})[0]["model"] == DISTSERVE_COLOCATED
        seen = set()
        for _ in range(4):                          # Triton takes turns over the instances
            answer = generate(http_url, COLOCATED, {"request": "{}"})
            seen.add((answer["instance"], tuple(answer["affinity"])))
        cores = colocated_deployment().colocated.devices
        assert seen == {(f"{COLOCATED}_0_{i}", c) for i, c in enumerate(cores)}
        status, _ = http_post(http_url, f"/v2/models/{DISTSERVE}/generate", {"text_input": "Hi"})
        assert status == 404                        # only the baseline is served
