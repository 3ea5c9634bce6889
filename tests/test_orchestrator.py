"""The orchestrator pipeline over real prefill/decode workers in-process (transport faked by
direct calls instead of Triton BLS)."""
from __future__ import annotations

import asyncio
import json

import pytest

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.messages import DecodeRequest, PrefillRequest, decode, encode, is_final
from backends.core.sampling import SamplingParams
from backends.decode.worker import DecodeWorker
from backends.orchestrator.pipeline import Orchestrator
from backends.prefill.worker import PrefillWorker
from kvtransfer import make_exporter, make_importer


@pytest.fixture(scope="module")
def system(smollm_fp32, smollm_tokenizer):
    config, sd = smollm_fp32
    eos = tuple(sorted(smollm_tokenizer.stop_token_ids))
    pcfg = EngineConfig(dtype="float32", role="prefill", limits=EngineLimits(num_kv_blocks=64))
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0")
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool, eos_token_ids=eos), exporter)
    dengine = LLMEngine(config, sd, EngineConfig(dtype="float32", role="decode",
                                                 limits=EngineLimits(num_kv_blocks=64)),
                        eos_token_ids=eos)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    offline = LLM(LLMEngine(config, sd, EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=64)),
                            eos_token_ids=eos), smollm_tokenizer)
    yield prefill, decode, Orchestrator(smollm_tokenizer, 2048), offline
    prefill.close()
    decode.close()


class Transport:
    """Stands in for Triton BLS: runs the workers' steps until the request's outputs appear."""

    def __init__(self, prefill: PrefillWorker, decode: DecodeWorker) -> None:
        self.prefill, self.decode = prefill, decode
        self.cancelled: list[tuple[str, str]] = []
        self.decode_steps = 0

    async def call_prefill(self, payload: str) -> str:
        self.prefill.submit(decode(payload, PrefillRequest))
        while True:
            for _, out in self.prefill.step():
                return encode(out)

    async def call_decode(self, payload: str):
        self.decode.submit(decode(payload, DecodeRequest))
        while True:
            self.decode_steps += 1
            for _, out in self.decode.step():
                yield encode(out)
                if is_final(out):
                    return

    def cancel(self, instance_id: str, req_id: str) -> None:
        self.cancelled.append((instance_id, req_id))
        (self.decode if instance_id.startswith("decode") else self.prefill).cancel(req_id)


def _run(orch: Orchestrator, transport: Transport, inputs: dict) -> list:
    async def go():
        gen = orch.parse(inputs)
        return [c async for c in orch.run(gen, transport.call_prefill, transport.call_decode,
                                          transport.cancel)]
    return asyncio.run(go())


def test_streamed_text_matches_offline_engine(system):
    prefill, decode, orch, offline = system
    transport = Transport(prefill, decode)
    chunks = _run(orch, transport, {"text_input": "The capital of France is", "max_tokens": 12,
                                    "stream": True, "return_token_ids": True, "return_timing": True,
                                    "ignore_eos": True})
    expected = offline.generate(["The capital of France is"],
                                SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert chunks[0].finish_reason is None and len(chunks) > 2        # really streamed
    assert chunks[-1].finish_reason == "length"
    timing = chunks[-1].timing
    assert timing.kv_bytes > 0 and timing.output_tokens == 12 and timing.kv_transfer_s > 0
    prefill.step()
    assert prefill.engine.blocks.num_used == 0 and decode.engine.blocks.num_used == 0


def test_chat_messages_and_non_streaming(system):
    prefill, decode, orch, offline = system
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chunks = _run(orch, Transport(prefill, decode), {"messages": json.dumps(messages), "max_tokens": 10})
    assert len(chunks) == 1 and chunks[0].finish_reason in ("stop", "length")
    expected = offline.generate([messages], SamplingParams(max_tokens=10, temperature=0))[0]
    assert chunks[0].text == expected.text


def test_stop_string_cancels_decode(system):
    prefill, decode, orch, offline = system
    full = offline.generate(["The capital of France is"],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    stop = full.strip().split()[2]                 # a word that appears mid-output
    transport = Transport(prefill, decode)
    chunks = _run(orch, transport, {"text_input": "The capital of France is", "max_tokens": 12,
                                    "stop": [stop], "ignore_eos": True, "stream": True})
    text = "".join(c.text for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert transport.cancelled and transport.cancelled[0][0] == "decode-0"
    decode.step()
    prefill.step()
    assert decode.engine.blocks.num_used == 0 and prefill.engine.blocks.num_used == 0


@pytest.mark.parametrize("inputs, match", [
    ({}, "exactly one"), ({"text_input": "hi", "input_ids": [1]}, "exactly one"),
    ({"text_input": ""}, "empty"), ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "hi", "max_tokens": 10**6}, "too large"),
    ({"text_input": "hi", "temperature": float("nan")}, "temperature"),
    ({"text_input": "hi", "top_p": 2.0}, "top_p"), ({"input_ids": [10**7]}, "input_ids"),
    ({"messages": "not json"}, "JSON"), ({"messages": '[{"role": "robot", "content": "x"}]'}, "role"),
    ({"text_input": "word " * 3000}, "context length"),
    ({"text_input": "hi", "slo_ttft_s": 0.0}, "slo_ttft_s"), ({"text_input": "hi", "slo_tpot_s": True}, "slo_tpot_s"),
])
def test_bad_inputs_are_clear_errors(system, inputs, match):
    orch = system[2]
    with pytest.raises(ValueError, match=match):
        orch.parse(inputs)


def test_a_split_request_cancels_on_its_decode_instance_only_if_it_did_not_finish():
    """The adapter's _expected (adaptive mode's split requests): an error, or a client gone
    before the last chunk, tells the decode instance to forget the request; a request that got
    its last chunk does not, though the Triton adapter stops iterating at that chunk and the
    generator is only finalized later."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace
    from backends.orchestrator.pipeline import Chunk
    from backends.serving.orchestrator_adapter import OrchestratorModel

    model = OrchestratorModel.__new__(OrchestratorModel)
    model.pool = ThreadPoolExecutor(1)
    expected, cancelled = [], []
    model._send_expect = lambda instance, req_id, sure: expected.append((instance, req_id))
    model._cancel = lambda instance, req_id: cancelled.append((instance, req_id))

    def serve(req_id: str, fail: bool = False, stop_after: int | None = None) -> list[Chunk]:
        gen = SimpleNamespace(req_id=req_id, params=SamplingParams(max_tokens=4))

        async def run():
            yield Chunk("a", [1])
            if fail:
                raise RuntimeError("prefill failed")
            yield Chunk("b", [2])
            yield Chunk("c", [3], finish_reason="length")

        async def respond() -> list[Chunk]:
            got = []
            async for chunk in model._expected(run, "decode_0", gen):   # as _respond consumes it
                got.append(chunk)
                if chunk.finish_reason is not None or len(got) == stop_after:
                    return got
            return got
        try:
            return asyncio.run(respond())      # run() ends the loop: abandoned generators finalized
        except RuntimeError:
            return []

    assert [c.text for c in serve("done")] == ["a", "b", "c"]
    assert serve("failed", fail=True) == []
    assert len(serve("gone", stop_after=2)) == 2
    model.pool.shutdown()
    assert [r for _, r in expected] == ["done", "failed", "gone"]
    assert cancelled == [("decode_0", "failed"), ("decode_0", "gone")]
