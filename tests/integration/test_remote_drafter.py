"""The drafter on a core of its own, served (decode.draft_devices): a real tritonserver whose
decode instance speculates with a drafter process on the prefill core. Greedy float32 outputs
equal the offline engine's without speculation, also when the drafter is SIGKILLed mid-stream;
the decode instance restarts it and holds nothing after."""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import psutil

from client import DistServeClient
from deploy.deployment import default_deployment
from deploy.render import render_repository
from tests.integration.conftest import instance_stats, start_server, wait_kv_free
from tests.integration.test_distserve import PROMPTS, offline  # noqa: F401 - offline: a fixture


def _wait_stats(server, cond, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not cond(stats := instance_stats(server, "decode-0")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cond(stats), stats
    return stats


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_drafter_on_its_own_core_gives_plain_tokens_and_outlives_a_sigkill(tmp_path, gguf_path, offline):
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024)
    cores = [deployment.prefill.devices[0]]                 # the drafter beside prefill
    deployment = dataclasses.replace(deployment, decode=dataclasses.replace(
        deployment.decode, speculative="ngram", num_speculative_tokens=3, draft_devices=cores))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    prompt = PROMPTS[5]                                     # repetitive: drafts are accepted
    expected = offline(prompt, 48).token_ids
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        first = _wait_stats(srv, lambda s: s["drafter_up"] == 1)["drafter_pid"]
        assert os.sched_getaffinity(first) == set(cores[0])
        got = DistServeClient(srv.grpc_url, "grpc", timeout=120).generate(
            prompt, max_tokens=48, ignore_eos=True, return_token_ids=True)
        assert got.token_ids == expected
        stats = instance_stats(srv, "decode-0")
        assert stats["drafter_drafts"] > 0 and stats["spec_accepted"] > 0, stats
        print({k: v for k, v in stats.items() if k.startswith(("spec_", "drafter_"))})

        tokens = []
        for chunk in DistServeClient(srv.http_url, "http", timeout=120).stream(
                prompt, max_tokens=48, ignore_eos=True, return_token_ids=True):
            tokens += chunk.token_ids
            if first is not None and len(tokens) >= 4:      # mid-stream
                os.kill(first, signal.SIGKILL)
                killed, first = first, None
        assert first is None and tokens == expected
        stats = _wait_stats(srv, lambda s: s["drafter_up"] == 1 and s["drafter_pid"] != killed)
        assert stats["drafter_failures"] == 1 and _gone(killed), stats
        wait_kv_free(srv, ("prefill-0", "decode-0"))
        drafter = stats["drafter_pid"]
    assert _gone(drafter)                                   # ended with its instance
