"""Prefill and decode workers in one process over the real shm transport (no Triton)."""
from __future__ import annotations

import json

import pytest

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.messages import DecodeRequest, PrefillRequest, PrefillResult
from backends.core.sampling import SamplingParams
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillError, PrefillWorker
from kvtransfer import make_exporter, make_importer
from tests.helpers import assert_no_leaks, generate

PARAMS = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pair(tiny_llama):
    config, sd = tiny_llama
    clock = FakeClock()
    pcfg = EngineConfig(dtype="float32", block_size=4, num_kv_blocks=32, role="prefill")
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, clock)
    dcfg = EngineConfig(dtype="float32", block_size=4, num_kv_blocks=16, role="decode")
    dengine = LLMEngine(config, sd, dcfg)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    yield prefill, decode, clock
    decode.close()
    prefill.close()


def _prefill(prefill: PrefillWorker, reqs: list[PrefillRequest]) -> dict[str, PrefillResult]:
    for r in reqs:
        prefill.submit(r)
    results = {}
    while len(results) < len(reqs):
        for res in prefill.step():
            results[res.req_id] = res
    return results


def _decode_all(decode: DecodeWorker) -> dict[str, list]:
    outs: dict[str, list] = {}
    while decode.has_work():
        for o in decode.step():
            outs.setdefault(o.req_id, []).append(o)
    return outs


def _decode_request(req: PrefillRequest, res: PrefillResult) -> DecodeRequest:
    params = SamplingParams(**{**req.params.__dict__, "seed": res.seed})
    return DecodeRequest(req.req_id, req.prompt_ids, res.first_token_id, params, res.kv)


def test_disaggregated_tokens_equal_one_engine(tiny_llama, pair):
    prefill, decode, _ = pair
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 22)]
    reference = generate(LLMEngine(*tiny_llama, EngineConfig(dtype="float32", block_size=4)), prompts, PARAMS)
    reqs = [PrefillRequest(f"r{i}", p, PARAMS) for i, p in enumerate(prompts)]
    results = _prefill(prefill, reqs)
    assert prefill.engine.stats().last_batch_size == 3          # batched in one prefill
    for req in reqs:
        decode.submit(_decode_request(req, results[req.req_id]))
    outs = _decode_all(decode)
    for i, req in enumerate(reqs):
        tokens = [results[req.req_id].first_token_id] + [t for o in outs[req.req_id] for t in o.token_ids]
        assert tokens == reference[i]
        assert any(o.kv_bytes > 0 for o in outs[req.req_id])      # the hand-off is reported
    prefill.step()                                               # collects released leases
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


def test_pull_based_admission_waits_for_free_blocks(tiny_llama, pair):
    prefill, decode, _ = pair
    # 16 decode blocks of 4 tokens; each request needs 4 prompt blocks (+ growth): not all fit.
    reqs = [PrefillRequest(f"r{i}", list(range(5, 21)), PARAMS) for i in range(5)]
    results = _prefill(prefill, reqs)
    for req in reqs:
        decode.submit(_decode_request(req, results[req.req_id]))
    decode.step()
    assert decode.pending, "some requests must wait in the prefill pool"
    assert prefill.stats()["leases"] == 5
    outs = _decode_all(decode)
    assert all(o[-1].finished and o[-1].error is None for o in outs.values())
    prefill.step()
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


def test_forged_and_stale_descriptors_are_rejected(pair):
    prefill, decode, _ = pair
    req = PrefillRequest("a", list(range(3, 12)), PARAMS)
    res = _prefill(prefill, [req])["a"]
    forged = json.loads(res.kv)
    forged["lease_id"] = forged["lease_id"] ^ 1
    bad = [json.dumps(forged), '{"transport": "shm"}', "not json",
           res.kv.replace(forged["pool_name"], "distserve-kv-0-0123456789abcdef")]
    for i, kv in enumerate(bad):
        decode.submit(DecodeRequest(f"bad{i}", req.prompt_ids, res.first_token_id,
                                    SamplingParams(seed=1), kv))
    outs = _decode_all(decode)
    assert all(o[-1].finish_reason == "error" and o[-1].error for o in outs.values())
    assert_no_leaks(decode.engine)
    # The real descriptor still works after the forgeries, then goes stale.
    decode.submit(_decode_request(req, res))
    assert _decode_all(decode)["a"][-1].error is None
    decode.submit(_decode_request(req, res))
    stale = _decode_all(decode)["a"][-1]
    assert stale.finish_reason == "error" and "lease" in stale.error.lower()
    prefill.step()
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


def test_unclaimed_lease_expires_and_blocks_are_reclaimed(pair):
    prefill, decode, clock = pair
    _prefill(prefill, [PrefillRequest("a", list(range(3, 12)), PARAMS)])
    assert prefill.engine.blocks.num_used > 0
    clock.now += 4.0
    prefill.step()
    assert prefill.engine.blocks.num_used > 0                    # not yet
    clock.now += 2.0
    prefill.step()
    assert_no_leaks(prefill.engine)


def test_cancel_frees_kv_on_both_sides(pair):
    prefill, decode, _ = pair
    reqs = [PrefillRequest(f"r{i}", list(range(3, 15)), PARAMS) for i in range(2)]
    results = _prefill(prefill, reqs)
    decode.submit(_decode_request(reqs[0], results["r0"]))
    decode.step()
    decode.step()
    assert decode.engine.blocks.num_used > 0
    decode.cancel("r0")
    prefill.cancel("r1")                                          # never reached decode
    decode.step()
    prefill.step()
    assert_no_leaks(decode.engine)
    assert_no_leaks(prefill.engine)


def test_bad_prefill_requests(pair):
    prefill, _, _ = pair
    with pytest.raises(ValueError, match="empty"):
        prefill.submit(PrefillRequest("a", [], PARAMS))
    with pytest.raises(ValueError):
        PrefillRequest.from_json('{"req_id": "a", "prompt_ids": [1], "params": {"top_p": 2}}')
    with pytest.raises(ValueError, match="unknown"):
        PrefillRequest.from_json('{"req_id": "a", "prompt_ids": [1], "params": {"bogus": 1}}')
    prefill.submit(PrefillRequest("dup", [3, 4], PARAMS))
    prefill.submit(PrefillRequest("dup", [3, 4], PARAMS))
    outs = prefill.step()
    assert any(isinstance(o, PrefillError) and "already in use" in o.error for o in outs)


def test_a_lease_that_expires_while_waiting_for_decode_fails_the_request(tiny_llama, pair):
    """Decode admission waits (pull-based) longer than the lease: the request must end with a
    clear error, not wait forever; the others finish."""
    prefill, decode, clock = pair
    reqs = [PrefillRequest(f"r{i}", list(range(5, 21)), PARAMS) for i in range(5)]
    results = _prefill(prefill, reqs)
    for req in reqs:
        decode.submit(_decode_request(req, results[req.req_id]))
    decode.step()
    waiting = {req.req_id for req, _ in decode.pending}
    assert waiting
    clock.now += 6.0                        # past the 5 s lease
    prefill.step()                          # prefill reclaims the expired leases
    outs = _decode_all(decode)
    for rid in waiting:
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason == "error", outs[rid]
        assert "lease" in outs[rid][-1].error.lower()
    prefill.step()
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)
