"""Stream parsing of the benchmark endpoints and the replay runner, against in-process fake
servers: HTTP (aiohttp) that speaks Triton's generate_stream and OpenAI's /v1/completions, and
gRPC (tests/fake_triton_grpc.py) that speaks Triton's ModelStreamInfer.
No Triton here: tests/integration covers the real server."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from client.bench.endpoints import (OpenAICompletions, SSEDecoder, TritonGrpc, TritonHttp,
                                    make_endpoint, openai_event, triton_event)
from client.bench.metrics import RequestResult, summarize
from client.bench.runner import replay_async
from client.bench.workloads import Request
from client.results import DistServeError
from deploy.contract import Timing
from tests.fake_triton_grpc import inputs, response, serve

TOKEN_GAP = 0.005


# ---- parsing -----------------------------------------------------------------------------------

def feed_all(lines):
    decoder, out = SSEDecoder(), []
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            out.append(data)
    tail = decoder.flush()
    return out + ([tail] if tail is not None else [])


def test_sse_decoder():
    lines = [b'data: {"a": 1}\n', b"\n", b": keep-alive\n", b"\n", b'data:{"b": 2}\r\n', b"\r\n",
             b"event: x\n", b"data: line1\n", b"data: line2\n", b"\n", b'data: {"last": 3}']
    assert feed_all(lines) == ['{"a": 1}', '{"b": 2}', "line1\nline2", '{"last": 3}']


def test_triton_event_counts_token_ids_scalar_or_list():
    assert triton_event('{"text_output": "a", "token_ids": 42}').num_tokens == 1     # scalar
    assert triton_event('{"text_output": "", "token_ids": 0}').num_tokens == 1       # lone id 0
    assert triton_event('{"text_output": "ab", "token_ids": [5, 6]}').num_tokens == 2
    last = triton_event('{"text_output": "", "token_ids": [], "finish_reason": "length", '
                        '"timing": "{\\"kv_bytes\\": 8}"}')
    assert (last.num_tokens, last.finish_reason, last.timing) == (0, "length", Timing(kv_bytes=8))
    assert triton_event('{"text_output": "x"}').num_tokens == 1      # text without ids: one


def test_triton_event_errors():
    with pytest.raises(DistServeError, match="out of KV blocks"):
        triton_event('{"error": "out of KV blocks"}')
    with pytest.raises(DistServeError, match="malformed"):
        triton_event("{not json")


def test_openai_event():
    assert openai_event("[DONE]") is None and openai_event(" [DONE] ") is None
    e = openai_event('{"choices": [{"text": "hi", "index": 0, "finish_reason": null}]}')
    assert (e.num_tokens, e.finish_reason, e.total_tokens) == (1, None, None)
    e = openai_event('{"choices": [{"text": "", "finish_reason": "length"}]}')
    assert (e.num_tokens, e.finish_reason) == (0, "length")
    e = openai_event('{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 17}}')
    assert (e.num_tokens, e.total_tokens) == (0, 17)
    e = openai_event('{"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"]}}]}')
    assert e.num_tokens == 2
    with pytest.raises(DistServeError, match="context length exceeded"):
        openai_event('{"error": {"message": "context length exceeded", "type": "invalid"}}')
    with pytest.raises(DistServeError, match="overloaded"):
        openai_event('{"error": "overloaded"}')


def test_unknown_endpoint_lists_the_valid_ones():
    with pytest.raises(ValueError, match="openai.*triton-grpc.*triton-http"):
        make_endpoint("vllm", "x", "m")


# ---- the runner against fake servers -------------------------------------------------------------
# The first prompt token picks the behaviour: 1 ok, 2 error event mid-stream, 3 HTTP 400 (gRPC:
# an error response at once), 4 hangs (timeout), 5 ends without a token.
LAST = {"finish_reason": "length", "timing": json.dumps({"prefill_queue_s": 0.25, "kv_bytes": 64})}

async def _stream(request: web.Request, events: list[str], behaviour: int) -> web.StreamResponse:
    if behaviour == 3:
        return web.json_response({"error": "bad input"}, status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if behaviour == 4:
        await asyncio.sleep(30)
    for i, event in enumerate(events):
        if behaviour == 5:
            break
        if behaviour == 2 and i == 2:
            await resp.write(b'data: {"error": "boom"}\n\n')
            break
        await asyncio.sleep(TOKEN_GAP)
        await resp.write(f"data: {event}\n\n".encode())
    await resp.write_eof()
    return resp


async def fake_triton(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert request.match_info["model"] == "distserve"
    assert body["stream"] is True and body["ignore_eos"] is True and body["return_token_ids"] is True
    n = body["max_tokens"]
    events = [json.dumps({"text_output": "t", "token_ids": 100 + i,     # one id: a JSON scalar
                          **(LAST if i == n - 1 else {})}) for i in range(n)]
    return await _stream(request, events, body["input_ids"][0])


async def fake_openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body["stream"] is True and body["ignore_eos"] is True and isinstance(body["prompt"], list)
    n = body["max_tokens"]
    events = [json.dumps({"choices": [{"index": 0, "text": "t",
                                       "finish_reason": "length" if i == n - 1 else None}]})
              for i in range(n)]
    events += [json.dumps({"choices": [], "usage": {"completion_tokens": n}}), "[DONE]"]
    return await _stream(request, events, body["prompt"][0])


def grpc_triton(request) -> list:
    """fake_triton's behaviours on Triton's gRPC stream; the last token's response is final."""
    values = inputs(request)
    behaviour, n = int(values["input_ids"][0]), int(values["max_tokens"][0])
    assert values["ignore_eos"].tolist() == [True] and values["return_token_ids"].tolist() == [True]
    if behaviour in (3, 4, 5):
        return {3: [response(error="bad input")], 4: [30.0], 5: [response(final=True)]}[behaviour]
    last = dict(finish=LAST["finish_reason"], timing=json.loads(LAST["timing"]), final=True)
    steps: list = []
    for i in range(n):
        if behaviour == 2 and i == 2:
            return steps + [response(error="boom")]
        steps += [TOKEN_GAP, response("t", 100 + i, **(last if i == n - 1 else {}))]
    return steps


async def run_against(endpoint_cls, requests, arrivals, timeout_s=1.0):
    if endpoint_cls is TritonGrpc:
        with serve(grpc_triton) as (url, triton):
            async with TritonGrpc(url, "distserve") as endpoint:
                results = await replay_async(endpoint, requests, arrivals, timeout_s=timeout_s,
                                             progress=False)
                for _ in range(200):             # the stream's own cancel, before the channel's
                    if triton.cancelled:
                        break
                    await asyncio.sleep(0.01)
                return results, list(triton.cancelled)
    app = web.Application()
    app.router.add_post("/v2/models/{model}/generate_stream", fake_triton)
    app.router.add_post("/v1/completions", fake_openai)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        model = "distserve" if endpoint_cls is TritonHttp else "some-model"
        async with endpoint_cls(f"127.0.0.1:{port}", model) as endpoint:
            return await replay_async(endpoint, requests, arrivals, timeout_s=timeout_s,
                                      progress=False)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("endpoint_cls", [TritonHttp, TritonGrpc, OpenAICompletions])
def test_replay_records_every_request(endpoint_cls):
    behaviours = [1, 2, 1, 3, 4, 5, 1, 1]
    outputs = [6, 6, 1, 6, 6, 6, 12, 3]
    requests = [Request((b, 7, 8), n, f"r{i}") for i, (b, n) in enumerate(zip(behaviours, outputs))]
    arrivals = [0.02 * i for i in range(len(requests))]
    results = asyncio.run(run_against(endpoint_cls, requests, arrivals, timeout_s=1.0))
    if endpoint_cls is TritonGrpc:
        results, cancelled = results
        assert len(cancelled) == 1                       # the one that timed out, on the server

    assert [r.index for r in results] == list(range(len(requests)))
    assert all(r.send_s >= r.arrival_s - 1e-6 for r in results)
    by = {i: r for i, r in enumerate(results)}
    for i in (0, 2, 6, 7):                               # served in full
        r = by[i]
        assert r.ok and r.error is None, r
        assert r.num_tokens == outputs[i] and r.finish_reason == "length"
        assert 0 < r.ttft_s < 0.5 and r.e2e_s >= r.ttft_s
    assert by[2].tpot_s is None                          # one token: no TPOT
    if endpoint_cls is not OpenAICompletions:            # the server's breakdown is kept
        assert by[0].server_timing == Timing(prefill_queue_s=0.25, kv_bytes=64)
        assert summarize(results)["server_timing_mean"] == {"kv_bytes": 64.0, "prefill_queue_s": 0.25}
        record = json.loads(json.dumps(by[0].to_json()))       # result files keep the dict
        assert record["server_timing"] == {"prefill_queue_s": 0.25, "kv_bytes": 64}
        assert RequestResult.from_json(record) == by[0]
    assert by[6].tpot_s >= TOKEN_GAP * 0.8               # per token, not per request
    assert "boom" in by[1].error and by[1].num_tokens == 2
    assert "bad input" in by[3].error and (endpoint_cls is TritonGrpc or "HTTP 400" in by[3].error)
    assert by[4].error.startswith("timeout") and by[4].e2e_s >= 1.0
    assert "without a token" in by[5].error
    assert sum(r.ok for r in results) == 4


def test_replay_rejects_mismatched_arrivals():
    with pytest.raises(ValueError):
        asyncio.run(replay_async(TritonHttp("x", "m"), [Request((1,), 1, "a")], [0.0, 1.0],
                                 progress=False))


def test_measurements_share_one_event_loop(monkeypatch):
    """grpc.aio hands a closed channel's late completions to the loop the channel was made on:
    every replay of a process runs on one loop, which stays open between them."""
    from client.bench import runner
    loops = []
    real = runner.replay_async

    async def spy(*args, **kwargs):
        loops.append(asyncio.get_running_loop())
        return await real(*args, **kwargs)
    monkeypatch.setattr(runner, "replay_async", spy)
    with serve(grpc_triton) as (url, _):
        for rnd in range(2):                            # a stream that times out in each
            requests = [Request((b, 7, 8), 4, f"r{rnd}-{i}") for i, b in enumerate([1, 4, 1])]
            results = runner.replay("triton-grpc", url, "distserve", requests, [0.0, 0.01, 0.02],
                                    timeout_s=0.3, progress=False)
            assert [r.ok for r in results] == [True, False, True]
    assert len(loops) == 2 and loops[0] is loops[1] and not loops[0].is_closed()
