"""Adaptive mode with a decode instance on the prefill instance's core (adaptive-shared), on
the real server: the router prefers local prefill where it meets both SLOs, a conversation's
second turn goes to the decode instance that holds its first turn's KV (the cache affinity)
and reuses it, outputs equal the offline engine's (float32, greedy), no KV is left held."""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends.core.engine import EngineConfig
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.sampling import SamplingParams
from client import DistServeClient
from deploy.deployment import default_deployment
from deploy.render import render_repository
from tests.integration.conftest import instance_stats, start_server, wait_kv_free


@pytest.fixture(scope="module")
def offline(gguf_path):
    llm = LLM.from_path(str(gguf_path), EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=256)))
    return lambda prompt, n: llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0,
                                                                   ignore_eos=True))[0]


def test_second_turn_follows_its_cached_history(tmp_path, gguf_path, offline):
    from planner.deployment import serving, with_decode_on_prefill_cores
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024, slo_ttft_s=10.0, slo_tpot_s=0.5)
    deployment = with_decode_on_prefill_cores(serving(deployment, "adaptive"))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    history = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)     # ~300 tokens
    turn2 = history + " And then the dog woke up and said:"
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        client = DistServeClient(srv.grpc_url, "grpc", timeout=120)
        assert client.generate("Hello", max_tokens=2).text          # pages published, warm
        first = client.generate(history, max_tokens=4, ignore_eos=True, return_token_ids=True,
                                return_timing=True)
        # then a long generation keeps turn 1's decode instance busy: the idle one predicts the
        # lower TTFT for a cold prompt, the busy one the lower for turn 2, whose history it holds
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(client.generate, "Count to one hundred:", max_tokens=160,
                               ignore_eos=True, return_timing=True)
            time.sleep(2.0)
            second = client.generate(turn2, max_tokens=4, ignore_eos=True, return_token_ids=True,
                                     return_timing=True)
            rb = busy.result().timing.route
        r1, r2 = first.timing.route, second.timing.route
        assert r1["kind"] == "local" and "local preferred" in r1["reason"], r1
        assert rb["kind"] == "local" and rb["decode"] == r1["decode"], (r1, rb)
        assert r2["kind"] == "local" and r2["decode"] == r1["decode"], (r1, r2)
        idle = next(o for o in r2["options"] if o["kind"] == "local" and o["decode"] != r2["decode"])
        assert "cached" not in idle["reason"], idle
        chosen = next(o for o in r2["options"] if o["kind"] == "local" and o["decode"] == r2["decode"])
        assert "prompt tokens cached" in chosen["reason"], chosen
        assert first.token_ids == offline(history, 4).token_ids
        assert second.token_ids == offline(turn2, 4).token_ids
        stats = instance_stats(srv, r2["decode"])
        assert stats["prefix_hit_tokens"] >= 256, stats             # turn 1's prompt blocks
        wait_kv_free(srv, ("prefill-0", "decode-0", "decode-1"))
