"""The colocated baseline end to end: a real tritonserver serving `python -m deploy serve
--baseline chunked`'s repository (two colocated instances, cores 0 and 1, chunked prefill with a
small budget so prompts really are split), called as `distserve_colocated` with the distserve
contract. float32 so outputs compare exactly with the offline engine."""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends.core.engine import EngineConfig
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.sampling import SamplingParams
from client import DistServeClient
from deploy.contract import DISTSERVE_COLOCATED, Timing
from deploy.deployment import colocated_deployment
from deploy.render import render_repository
from tests.integration.conftest import (http_post, instance_stats, replay_and_account, start_server,
                                        wait_kv_free)

INSTANCES = ("colocated-0", "colocated-1")
LONG = "The quick brown fox jumps over the lazy dog. " * 6          # ~60 tokens: several chunks
PROMPTS = ["The capital of France is", LONG, "def fibonacci(n):", "Once upon a time"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_path):
    d = colocated_deployment(str(gguf_path), chunked_prefill=True)
    small = dataclasses.replace(d.colocated, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=16)
    d = dataclasses.replace(d, dtype="float32", max_model_len=1024, default_max_tokens=32, colocated=small)
    repo = render_repository(d, tmp_path_factory.mktemp("repo") / "model_repository", require_code=True)
    with start_server(repo, run_dir=tmp_path_factory.mktemp("run")) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(gguf_path) -> dict[str, list[int]]:
    """Greedy tokens of each prompt from the offline engine (float32), in one batched run."""
    llm = LLM.from_path(str(gguf_path), EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=256)))
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return {p: c.token_ids for p, c in zip(PROMPTS, out)}


def test_greedy_output_identical_over_http_and_grpc(server, expected):
    body = {"text_input": LONG, "max_tokens": MAX_TOKENS, "ignore_eos": True, "return_timing": True,
            "return_token_ids": True}
    status, text = http_post(server.http_url, f"/v2/models/{DISTSERVE_COLOCATED}/generate", body)
    assert status == 200, text
    reply = json.loads(text)
    assert reply["token_ids"] == expected[LONG] and reply["finish_reason"] == "length"
    timing = Timing.from_dict(json.loads(reply["timing"]))
    assert 0 < timing.ttft_s < timing.e2e_s and timing.tpot_s > 0
    assert timing.prefill_s > 0 and timing.prefill_queue_s >= 0
    assert timing.output_tokens == MAX_TOKENS
    chunks = list(DistServeClient(server.grpc_url, "grpc", model=DISTSERVE_COLOCATED).stream(
        LONG, max_tokens=MAX_TOKENS, ignore_eos=True, return_token_ids=True))
    assert [t for c in chunks for t in c.token_ids] == expected[LONG]
    assert len(chunks) > 2                                          # really streamed


def test_concurrent_streams_are_correct_and_use_both_instances(server, expected):
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + 2 * i) for i in range(6)]
    before = [instance_stats(server, i)["requests_total"] for i in INSTANCES]

    def run(job):
        client = DistServeClient(server.grpc_url, "grpc", model=DISTSERVE_COLOCATED, timeout=300)
        return [t for c in client.stream(job[0], max_tokens=job[1], ignore_eos=True,
                                         return_token_ids=True) for t in c.token_ids]

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == [expected[p][:n] for p, n in jobs]
    served = [instance_stats(server, i)["requests_total"] - b for i, b in zip(INSTANCES, before)]
    assert sum(served) == len(jobs) and min(served) > 0, f"Triton did not spread the requests: {served}"
    wait_kv_free(server, INSTANCES)


def test_cancel_mid_stream_frees_kv(server):
    stream = DistServeClient(server.grpc_url, "grpc", model=DISTSERVE_COLOCATED).stream(
        PROMPTS[3], max_tokens=400, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 3:
            assert sum(instance_stats(server, s)["kv_blocks_used"] for s in INSTANCES) > 0
            stream.cancel()
            break
    wait_kv_free(server, INSTANCES)


@pytest.mark.parametrize("body, match", [
    ({"text_input": ""}, "empty"), ({"text_input": "hi", "max_tokens": 10**9}, "too large"),
    ({"text_input": "hello " * 2000}, "context length"), ({"text_input": "hi", "top_p": 2.0}, "top_p"),
], ids=["empty", "max_tokens", "too_long", "top_p"])
def test_bad_requests_get_clear_errors(server, body, match):
    status, text = http_post(server.http_url, f"/v2/models/{DISTSERVE_COLOCATED}/generate", body)
    assert status == 400, text
    assert match in json.loads(text)["error"]
    status, text = http_post(server.http_url, f"/v2/models/{DISTSERVE_COLOCATED}/generate",
                             {"text_input": "Hi", "max_tokens": 3})
    assert status == 200 and json.loads(text)["text_output"]


def test_benchmark_replay_accounts_for_every_request(server):
    """The baseline through the same benchmark client: every request accounted for."""
    replay_and_account(server, DISTSERVE_COLOCATED, "triton-grpc", 24, rate=8.0, seed=1)
    wait_kv_free(server, INSTANCES)
