"""The disaggregated system end to end: a real tritonserver serving the real model repository
(prefill on core 0, decode on core 1), called through HTTP generate / generate_stream and
gRPC streaming. float32 so outputs compare exactly with the offline engine."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.core.engine import EngineConfig
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.sampling import SamplingParams
from client import DistServeClient, DistServeError
from deploy.deployment import default_deployment
from deploy.render import render_repository
from tests.integration.conftest import (http_post, instance_stats, replay_and_account, start_server,
                                        wait_kv_free)

LEASE_TIMEOUT_S = 3.0
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "List three colours:", "Water boils at", "The quick brown fox jumps over the lazy dog. " * 4,
           "In 1969, the first person to walk on the moon was", "Hello, my name is"]


def _our_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"distserve-kv-{os.geteuid()}-")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_path):
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     lease_timeout_s=LEASE_TIMEOUT_S, max_model_len=1024,
                                     default_max_tokens=32)
    deployment = dataclasses.replace(
        deployment, prefill=dataclasses.replace(deployment.prefill, num_kv_blocks=256),
        decode=dataclasses.replace(deployment.decode, num_kv_blocks=256))
    repo = render_repository(deployment, tmp_path_factory.mktemp("repo") / "model_repository",
                             require_code=True)
    before = _our_segments()
    with start_server(repo, run_dir=tmp_path_factory.mktemp("run")) as srv:
        yield srv
    leftover = _our_segments() - before
    assert not leftover, f"shared-memory segments left after the server stopped: {leftover}"
    # every stub unloads cleanly: none crashes in its exit (metrics deleted in finalize,
    # backends/serving/metrics.py)
    log_text = srv.log_file.read_text(errors="replace")
    at = log_text.find("Fatal Python error")
    assert at < 0, f"a stub crashed as the server stopped:\n{log_text[max(0, at - 1500):at + 1500]}"


@pytest.fixture(scope="module")
def offline(smollm_tokenizer, gguf_path):
    llm = LLM.from_path(str(gguf_path), EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=256)))
    return lambda prompt, n: llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0,
                                                                   ignore_eos=True))[0]


def _stats(server, instance: str) -> dict:
    return instance_stats(server, instance)


def _wait_all_free(server, timeout: float = 10.0) -> None:
    wait_kv_free(server, ("prefill-0", "decode-0"), timeout)


def _metric(server, name: str, phase: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{[^}}]*phase="{phase}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


def test_greedy_output_identical_over_http_sse_and_grpc(server, offline):
    expected = offline(PROMPTS[0], 24)
    body = {"text_input": PROMPTS[0], "max_tokens": 24, "ignore_eos": True, "return_token_ids": True}
    status, text = http_post(server.http_url, "/v2/models/distserve/generate", body)
    assert status == 200, text
    assert json.loads(text)["text_output"] == expected.text
    http = DistServeClient(server.http_url, "http")
    grpc = DistServeClient(server.grpc_url, "grpc")
    for client in (http, grpc):
        chunks = list(client.stream(PROMPTS[0], max_tokens=24, ignore_eos=True, return_token_ids=True))
        assert "".join(c.text for c in chunks) == expected.text
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert chunks[-1].finish_reason == "length"


def test_16_concurrent_streams_are_batched_and_correct(server, offline):
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 3 * i) for i in range(16)]
    expected = [offline(p, n).text for p, n in jobs]
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _metric(server, "distserve_running", "decode"))
            time.sleep(0.05)

    def run(job):
        client = DistServeClient(server.grpc_url, "grpc", timeout=300)
        return "".join(c.text for c in client.stream(job[0], max_tokens=job[1], ignore_eos=True))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(run, jobs))
    finally:
        done.set()
        watcher.join()
    assert got == expected
    assert peak[0] > 1, f"decode never ran more than {peak[0]} sequences at once"
    _wait_all_free(server)


def test_first_token_is_sent_before_decode_starts(server):
    client = DistServeClient(server.grpc_url, "grpc")
    chunks = list(client.stream(PROMPTS[5], max_tokens=16, ignore_eos=True, return_timing=True,
                                return_token_ids=True))
    assert len(chunks[0].token_ids) == 1                 # the first chunk is prefill's token alone
    timing = chunks[-1].timing
    assert timing.first_token_at < timing.decode_admitted_at
    assert timing.ttft_s < timing.e2e_s
    assert timing.kv_bytes > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancel_mid_stream_frees_kv_on_both_instances(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    stream = DistServeClient(url, protocol).stream(PROMPTS[2], max_tokens=400, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 3:
            assert _stats(server, "decode-0")["kv_blocks_used"] > 0
            stream.cancel()
            break
    _wait_all_free(server)


def test_unclaimed_prefill_lease_is_reclaimed(server, smollm_tokenizer):
    request = {"type": "prefill", "req_id": "orphan", "prompt_ids": smollm_tokenizer.encode(PROMPTS[5]),
               "params": {"max_tokens": 8, "temperature": 0.0, "seed": 1}}
    status, text = http_post(server.http_url, "/v2/models/prefill_0/infer", {"inputs": [
        {"name": "request", "datatype": "BYTES", "shape": [1], "data": [json.dumps(request)]}]})
    assert status == 200, text
    assert json.loads(json.loads(text)["outputs"][0]["data"][0])["type"] == "prefilled"
    assert _stats(server, "prefill-0")["kv_blocks_used"] > 0
    time.sleep(LEASE_TIMEOUT_S + 1.0)
    assert _stats(server, "prefill-0")["kv_blocks_used"] == 0


BAD = [({"text_input": ""}, "empty"), ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
       ({"text_input": "hi", "max_tokens": -5}, "max_tokens"),
       ({"text_input": "hi", "max_tokens": 10**9}, "too large"),
       ({"text_input": "hi", "temperature": float("nan")}, "temperature"),
       ({"text_input": "hi", "top_p": 2.0}, "top_p"),
       ({"text_input": "hello " * 2000}, "context length"),
       ({"text_input": "hi", "max_tokens": "ten"}, "Unable to parse")]   # wrong dtype: Triton rejects


@pytest.mark.parametrize("body, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_clear_errors_and_server_stays_healthy(server, body, match):
    status, text = http_post(server.http_url, "/v2/models/distserve/generate",
                             {**body, "stream": False})
    assert status in (400, 500), text       # Triton answers its own parse errors with 500
    assert match in json.loads(text)["error"]
    status, text = http_post(server.http_url, "/v2/models/distserve/generate",
                             {"text_input": "Hi", "max_tokens": 3})
    assert status == 200 and json.loads(text)["text_output"]


def test_forged_or_stale_descriptor_sent_straight_to_decode(server, smollm_tokenizer):
    prompt = smollm_tokenizer.encode(PROMPTS[0])
    prefill = {"type": "prefill", "req_id": "real", "prompt_ids": prompt,
               "params": {"max_tokens": 8, "temperature": 0.0, "seed": 1}}
    status, text = http_post(server.http_url, "/v2/models/prefill_0/infer", {"inputs": [
        {"name": "request", "datatype": "BYTES", "shape": [1], "data": [json.dumps(prefill)]}]})
    result = json.loads(json.loads(text)["outputs"][0]["data"][0])
    kv = result["kv"]                                   # the descriptor, nested
    forged = dict(kv, lease_id=kv["lease_id"] ^ 0x5A5A)
    grpc = DistServeClient(server.grpc_url, "grpc")

    def decode_req(desc) -> dict:
        return {"type": "decode", "req_id": "x", "prompt_ids": prompt,
                "first_token_id": result["first_token_id"],
                "params": {"max_tokens": 8, "temperature": 0.0, "seed": 1}, "kv": desc}

    for desc in (forged, dict(kv, block_ids=[10**6]), "garbage"):
        with pytest.raises(DistServeError, match="lease|descriptor|KV|block ids|invalid"):
            _raw_decode(server, decode_req(desc))
    outputs = _raw_decode(server, decode_req(result["kv"]))          # the genuine one works once
    assert sum(len(json.loads(o).get("token_ids", [])) for o in outputs) == 7
    with pytest.raises(DistServeError, match="stale|lease"):
        _raw_decode(server, decode_req(result["kv"]))                 # ... and is then stale
    _wait_all_free(server)
    assert grpc.generate("Hi", max_tokens=3).text


def _raw_decode(server, request: dict) -> list[str]:
    import numpy as np
    import tritonclient.grpc as grpcclient
    results, errors = [], []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: errors.append(error) if error else results.append(result))
    tensor = grpcclient.InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(request).encode()], dtype=np.object_))
    client.async_stream_infer("decode_0", [tensor], request_id="raw")
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline and not any(
            r.get_response().parameters.get("triton_final_response", None) and
            r.get_response().parameters["triton_final_response"].bool_param for r in results):
        time.sleep(0.05)
    client.stop_stream()
    client.close()
    if errors:
        raise DistServeError(str(errors[0]))
    outputs = [r.as_numpy("response")[0].decode() for r in results if r.as_numpy("response") is not None]
    failed = [json.loads(o)["error"] for o in outputs if json.loads(o)["type"] == "failed"]
    if failed:                      # decode reports failures in its payload (see EngineModel)
        raise DistServeError(failed[0])
    return outputs


def _wait_prefill_reclaims(server) -> None:
    deadline = time.monotonic() + LEASE_TIMEOUT_S + 5
    while _stats(server, "prefill-0")["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats(server, "prefill-0")["kv_blocks_used"] == 0


@pytest.mark.parametrize("endpoint, num_good", [("triton-grpc", 30), ("triton-http", 12)])
def test_benchmark_replay_accounts_for_every_request(server, endpoint, num_good):
    """A few dozen real ShareGPT requests at 8 rps through the benchmark client (plus two the
    server refuses): every one completes in full or is reported failed; no KV is left held."""
    results = replay_and_account(server, "distserve", endpoint, num_good, rate=8.0)
    bad = [r.error for r in results if not r.ok]
    assert len(bad) == 2 and any("context" in e or "long" in e for e in bad), bad
    _wait_all_free(server)


def test_lease_expiring_while_decode_is_full_fails_the_request_instead_of_hanging(tmp_path, gguf_path):
    """Decode (one sequence at a time) cannot admit a second or third request before their
    half-second KV leases expire: whichever it admits first is served, the other two must fail
    with the hand-off error, promptly."""
    deployment = default_deployment(str(gguf_path))
    deployment = dataclasses.replace(deployment, lease_timeout_s=0.5, max_model_len=512,
                                     decode=dataclasses.replace(deployment.decode, max_num_seqs=1,
                                                                num_kv_blocks=64),
                                     prefill=dataclasses.replace(deployment.prefill, num_kv_blocks=64))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    from client.bench.pools import Request
    from client.bench.runner import replay
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        # the one admitted first keeps decode busy for 460 steps (>= 1.1 s even at 2.5 ms a
        # step: on an AMD EPYC core a step took 5-6 ms, and 120 steps outran a 1 s lease; all
        # three ask for as many, as decode may admit them in any order)
        requests = [Request(tuple(range(100, 140)), 460, f"r{i}") for i in range(3)]
        t0 = time.monotonic()
        results = replay("triton-grpc", srv.grpc_url, "distserve", requests, [0.0, 0.01, 0.02],
                         timeout_s=60, progress=False)
        assert time.monotonic() - t0 < 45, "a request waited for its timeout"
        served = [r for r in results if r.ok]
        assert len(served) == 1 and served[0].num_tokens == 460, results
        for r in results:
            if not r.ok:
                assert r.error and "lease" in r.error and "timeout" not in r.error, r
        wait_kv_free(srv, ("prefill-0", "decode-0"))


def test_overloaded_prefill_refuses_at_once_and_serves_what_it_took(tmp_path, gguf_path):
    """A burst beyond the prefill instance's bound (3 requests waiting, or a predicted first
    token later than 1 x the 1 s TTFT SLO): the excess is refused at once with "overloaded"
    (Triton's UNAVAILABLE, though its generate endpoint answers every model error with 400),
    what was taken is served, nothing is left held."""
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), max_model_len=1024,
                                     slo_ttft_s=1.0, overload_factor=1.0, max_queued_requests=3)
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    from client.bench.pools import Request
    from client.bench.runner import replay
    prompt = tuple(range(200, 700))                  # 500 tokens: a few tenths of a s each
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        burst = [Request(prompt, 4, f"b{i}") for i in range(12)]
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(replay, "triton-grpc", srv.grpc_url, "distserve", burst,
                                 [0.0] * len(burst), timeout_s=120, progress=False)
            deadline = time.monotonic() + 30         # until the burst fills the queue
            while instance_stats(srv, "prefill-0")["backlog_requests"] < 3:
                assert time.monotonic() < deadline and not future.done(), "the burst never queued"
                time.sleep(0.02)
            t0 = time.monotonic()
            status, text = http_post(srv.http_url, "/v2/models/distserve/generate",
                                     {"input_ids": list(prompt), "max_tokens": 4})
            refused_in = time.monotonic() - t0
            results = future.result()
        assert status == 400 and "overloaded" in json.loads(text)["error"], (status, text)
        assert refused_in < 1.0, f"the refusal took {refused_in:.2f} s"
        refused = [r for r in results if r.error]
        assert refused and all("overloaded" in r.error for r in refused), [r.error for r in refused]
        assert sum(r.ok and r.num_tokens == 4 for r in results) >= 1
        assert instance_stats(srv, "prefill-0")["rejected_total"] >= len(refused) + 1
        wait_kv_free(srv, ("prefill-0", "decode-0"))
        assert instance_stats(srv, "prefill-0")["backlog_tokens"] == 0
        status, text = http_post(srv.http_url, "/v2/models/distserve/generate",
                                 {"text_input": "Hi", "max_tokens": 3})
        assert status == 200, text


_VANISHING_CLIENT = """
import sys
from client import DistServeClient
stream = DistServeClient(sys.argv[1], protocol=sys.argv[2], timeout=300).stream(
    input_ids=list(range(300, 340)), max_tokens=20, ignore_eos=True)
for chunk in stream:
    print("chunk", flush=True)
"""


def _wait_for(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_client_vanishing_while_its_request_waits_for_decode_frees_it_at_once(tmp_path, gguf_path):
    """Decode runs one sequence at a time and is busy; a second client's request is prefilled
    and waits for admission, its KV lent by prefill. The client process is killed: the lease
    is given back and decode forgets the request within seconds, long before the busy
    sequence ends (without this, both waited for admission, then the KV copy, then a token)."""
    import subprocess
    import sys
    deployment = default_deployment(str(gguf_path))
    deployment = dataclasses.replace(deployment, max_model_len=1024, lease_timeout_s=120.0,
                                     decode=dataclasses.replace(deployment.decode, max_num_seqs=1))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    from client.bench.pools import Request
    from client.bench.runner import replay
    root = Path(__file__).resolve().parents[2]
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        stats = lambda i: instance_stats(srv, i)    # noqa: E731
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(replay, "triton-grpc", srv.grpc_url, "distserve",
                                  [Request(tuple(range(100, 140)), 600, "blocker")], [0.0],
                                  timeout_s=300, progress=False)
            _wait_for(lambda: stats("decode-0")["running"] == 1, 60, "the blocker decoding")
            for protocol, url in (("grpc", srv.grpc_url), ("http", srv.http_url)):
                client = subprocess.Popen([sys.executable, "-c", _VANISHING_CLIENT, url, protocol],
                                          cwd=root, stdout=subprocess.PIPE, text=True)
                try:
                    assert client.stdout.readline() == "chunk\n"       # its first token
                    _wait_for(lambda: stats("decode-0")["pending"] == 1, 10, "waiting for admission")
                    assert stats("prefill-0")["leases"] == 1
                finally:
                    client.kill()
                    client.wait()
                freed = _wait_for(lambda: stats("prefill-0")["leases"] == 0
                                  and stats("decode-0")["pending"] == 0, 5, f"{protocol}: freed")
                assert not blocker.done(), "the blocker ended first: the test proves nothing"
                print(f"{protocol}: freed {freed:.2f} s after the client died")
            result = blocker.result()[0]
        assert result.ok and result.num_tokens == 600, result
        wait_kv_free(srv, ("prefill-0", "decode-0"))


def test_adaptive_mode_prefills_short_prompts_on_decode_when_prefill_is_busy(tmp_path, gguf_path, offline):
    """Adaptive mode, on the real server: with prefill busy on long prompts, the router sends
    short prompts to the decode instance, which prefills them inside its decode steps; every
    output equals the offline engine's (float32, greedy)."""
    from planner.deployment import serving
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024, slo_ttft_s=1.0, slo_tpot_s=0.2)
    deployment = serving(deployment, "adaptive")
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        client = DistServeClient(srv.grpc_url, "grpc", timeout=120)
        assert client.generate("Hello", max_tokens=2).text          # pages published, warm
        # a request's own SLO reaches the router: a TTFT nothing can meet is judged missed
        hurried = client.generate("Hello", max_tokens=2, slo_ttft_s=1e-6, return_timing=True)
        assert hurried.timing.route["reason"].startswith("no option meets both SLOs"), hurried.timing
        with ThreadPoolExecutor(8) as pool:
            longs = [pool.submit(client.generate, long_prompt, max_tokens=4, ignore_eos=True,
                                 return_token_ids=True, return_timing=True) for _ in range(3)]
            time.sleep(0.3)
            shorts = [pool.submit(client.generate, p, max_tokens=8, ignore_eos=True,
                                  return_token_ids=True, return_timing=True) for p in PROMPTS[:4]]
            for p, f in zip(PROMPTS[:4], shorts):
                assert f.result().token_ids == offline(p, 8).token_ids, p
            for f in longs:
                assert f.result().token_ids == offline(long_prompt, 4).token_ids
        local = instance_stats(srv, "decode-0")["local_total"]
        assert local >= 1, "nothing went local"
        # each request's timing says where the router sent it, and why
        routes = [f.result().timing.route for f in longs + shorts]
        assert all(r["kind"] in ("split", "local") and r["reason"] and r["options"] for r in routes)
        assert sum(r["kind"] == "local" for r in routes) == local
        for r in routes:
            assert r["decode"] == "decode-0" and r["prefill"] == ("prefill-0" if r["kind"] == "split" else None)
        # decode was told of each split request before its prefill, and has forgotten them all
        stats = instance_stats(srv, "decode-0")
        assert stats["expected_total"] >= sum(r["kind"] == "split" for r in routes) >= 1, stats
        assert stats["expected"] == 0, stats
        wait_kv_free(srv, ("prefill-0", "decode-0"))


def test_speculative_decoding_serves_the_offline_engines_tokens(tmp_path, gguf_path, offline):
    """decode.speculative = "ngram" on the real server: greedy outputs (several tokens per
    decode step, streamed) equal the offline engine's without speculation, for a repetitive
    prompt and a chat prompt; the decode instance accepted draft tokens; nothing is left held."""
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024)
    deployment = dataclasses.replace(deployment, decode=dataclasses.replace(
        deployment.decode, speculative="ngram", num_speculative_tokens=3))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    chat = [{"role": "user", "content": "Repeat this line three times: the cat sat on the mat."}]
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        grpc = DistServeClient(srv.grpc_url, "grpc", timeout=120)
        got = grpc.generate(PROMPTS[5], max_tokens=48, ignore_eos=True, return_token_ids=True)
        assert got.token_ids == offline(PROMPTS[5], 48).token_ids
        expected = offline(chat, 48)
        chunks = list(DistServeClient(srv.http_url, "http", timeout=120).stream(
            messages=chat, max_tokens=48, ignore_eos=True, return_token_ids=True))
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert "".join(c.text for c in chunks) == expected.text
        stats = instance_stats(srv, "decode-0")
        assert stats["spec_accepted"] > 0 and stats["spec_emitted"] > stats["spec_verify_rows"], stats
        print({k: v for k, v in stats.items() if k.startswith("spec_")})
        wait_kv_free(srv, ("prefill-0", "decode-0"))
