"""The colocated baseline without Triton: ColocatedWorker over a real engine, and the
orchestrator's colocated front end over it (transport faked by direct calls)."""
from __future__ import annotations

import asyncio
import itertools

import pytest

from backends.colocated.worker import ColocatedWorker
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.messages import Accepted, Failed, GenerateRequest, Tokens, decode, encode
from backends.core.sampling import SamplingParams
from backends.orchestrator.pipeline import Orchestrator
from tests.helpers import assert_no_leaks, generate

PARAMS = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)


def make_worker(tiny_llama, max_model_len=None, **limits) -> ColocatedWorker:
    config = EngineConfig(dtype="float32", max_model_len=max_model_len,
                          limits=EngineLimits(block_size=4, num_kv_blocks=32, **limits))
    ticks = itertools.count()
    return ColocatedWorker(LLMEngine(*tiny_llama, config), "colocated-0", clock=lambda: float(next(ticks)))


def messages(worker: ColocatedWorker) -> list:
    return [msg for _, msg in worker.step()]


def run_all(worker: ColocatedWorker) -> dict[str, list]:
    outs: dict[str, list] = {}
    while worker.has_work():
        for o in messages(worker):
            outs.setdefault(o.req_id, []).append(o)
    return outs


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_streams_the_same_tokens_as_one_engine(tiny_llama, chunked):
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 22)]
    reference = generate(LLMEngine(*tiny_llama, EngineConfig(dtype="float32",
                                                             limits=EngineLimits(block_size=4))),
                                                                                 prompts, PARAMS)
    worker = make_worker(tiny_llama, chunked_prefill=chunked, max_num_batched_tokens=8, max_num_seqs=4)
    for i, p in enumerate(prompts):
        worker.submit(GenerateRequest(f"r{i}", p, PARAMS))
    outs = run_all(worker)
    for i in range(len(prompts)):
        accepted, first, *rest = outs[f"r{i}"]
        assert isinstance(accepted, Accepted) and accepted.instance_id == "colocated-0"   # cancel handle
        assert first.queue_s >= 0 and first.prefill_s > 0                       # first token's timing
        assert [t for o in [first, *rest] for t in o.token_ids] == reference[i]
        assert rest[-1].finished and rest[-1].finish_reason == "length"
        assert all(len(o.token_ids) == 1 for o in [first, *rest])               # one per step
    assert_no_leaks(worker.engine)


def test_first_token_timing_is_measured_on_the_clock(tiny_llama):
    worker = make_worker(tiny_llama)
    worker.submit(GenerateRequest("a", [5, 6, 7], PARAMS))    # arrives at t=0
    accepted, first = messages(worker)                        # step runs from t=1 to t=2
    assert (first.queue_s, first.prefill_s) == (1.0, 1.0)
    worker.cancel("a")
    worker.step()
    assert_no_leaks(worker.engine)


def test_cancel_mid_stream_and_before_start_frees_blocks(tiny_llama):
    worker = make_worker(tiny_llama)
    worker.submit(GenerateRequest("a", list(range(3, 20)), PARAMS))
    worker.step()
    worker.step()
    assert worker.engine.blocks.num_used > 0
    worker.cancel("a")
    worker.submit(GenerateRequest("b", list(range(3, 20)), PARAMS))
    worker.cancel("b")                                        # before it ever ran
    outs = messages(worker)
    assert [(o.req_id, type(o)) for o in outs] == [("a", Failed), ("b", Accepted), ("b", Failed)]
    assert outs[0].error == outs[2].error == "cancelled"
    assert not worker.has_work()
    assert_no_leaks(worker.engine)
    assert worker.stats()["queue_depth"] == worker.stats()["running"] == 0


def test_bad_requests(tiny_llama):
    worker = make_worker(tiny_llama, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        worker.submit(GenerateRequest("a", [], PARAMS))
    with pytest.raises(ValueError, match="context length"):
        worker.submit(GenerateRequest("a", [5] * 40, PARAMS))
    with pytest.raises(ValueError, match="not valid JSON"):
        decode('{"type": "generate", "req_id": "a", ', GenerateRequest)
    with pytest.raises(ValueError, match="unknown"):
        decode('{"type": "generate", "req_id": "a", "prompt_ids": [1], "params": {"bogus": 1}}',
               GenerateRequest)
    worker.submit(GenerateRequest("dup", [3, 4], PARAMS))
    worker.submit(GenerateRequest("dup", [3, 4], PARAMS))
    errors = [o for o in messages(worker) if isinstance(o, Failed)]
    assert len(errors) == 1 and "already in flight" in errors[0].error
    worker.cancel("dup")
    worker.step()
    assert_no_leaks(worker.engine)
    with pytest.raises(ValueError, match="role='both'"):
        ColocatedWorker(LLMEngine(*tiny_llama, EngineConfig(dtype="float32", role="decode")))


# ---- the colocated front end ----

@pytest.fixture(scope="module")
def colocated(smollm_fp32, smollm_tokenizer):
    config, sd = smollm_fp32
    eos = tuple(sorted(smollm_tokenizer.stop_token_ids))
    engine = LLMEngine(config, sd, EngineConfig(dtype="float32",
                                                limits=EngineLimits(num_kv_blocks=64,
                                                                    chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8)), eos_token_ids=eos)
    offline = LLM(LLMEngine(config, sd, EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=64)),
                            eos_token_ids=eos), smollm_tokenizer)
    return ColocatedWorker(engine, "colocated-0"), Orchestrator(smollm_tokenizer, 2048), offline


def _run(worker: ColocatedWorker, orch: Orchestrator, inputs: dict) -> tuple[list, list]:
    """The chunks of one request; the transport calls the worker's step directly."""
    cancelled = []

    async def stream(payload: str):
        worker.submit(decode(payload, GenerateRequest))
        while True:
            for _, out in worker.step():
                yield encode(out)
                if isinstance(out, (Tokens, Failed)) and out.finished:
                    return

    def cancel(instance_id: str, req_id: str) -> None:
        cancelled.append(instance_id)
        worker.cancel(req_id)

    async def go():
        return [c async for c in orch.run_colocated(orch.parse(inputs), stream, cancel)]
    return asyncio.run(go()), cancelled


def test_front_end_streams_what_the_offline_engine_generates(colocated):
    worker, orch, offline = colocated
    prompt = "The quick brown fox jumps over the lazy dog. " * 4       # longer than one chunk
    chunks, _ = _run(worker, orch, {"text_input": prompt, "max_tokens": 10, "stream": True,
                                    "return_token_ids": True, "ignore_eos": True})
    expected = offline.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert len(chunks) > 2 and chunks[-1].finish_reason == "length"
    timing = chunks[-1].timing
    assert 0 < timing.ttft_s < timing.e2e_s and timing.tpot_s > 0
    assert timing.prefill_s > 0 and timing.output_tokens == 10 and timing.kv_bytes is None
    assert_no_leaks(worker.engine)


def test_front_end_stop_string_cancels_on_the_instance(colocated):
    worker, orch, offline = colocated
    full = offline.generate(["The capital of France is"],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    stop = full.strip().split()[2]
    chunks, cancelled = _run(worker, orch, {"text_input": "The capital of France is", "max_tokens": 12,
                                            "stop": [stop], "ignore_eos": True})
    assert len(chunks) == 1 and chunks[0].text == full[:full.index(stop)]
    assert chunks[0].finish_reason == "stop" and cancelled == ["colocated-0"]
    worker.step()
    assert_no_leaks(worker.engine)
