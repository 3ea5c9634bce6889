"""Prefill and decode workers in one process over the real shm transport (no Triton)."""
from __future__ import annotations

import threading

import pytest

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.messages import (Accepted, Admitted, DecodeRequest, Failed, Prefilled,
                                    PrefillRequest, Tokens, decode as decode_message, encode)
from backends.core.sampling import SamplingParams
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillWorker
from kvtransfer import KVDescriptor, make_exporter, make_importer
from tests.helpers import assert_no_leaks, generate

PARAMS = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine_config(role: str, num_kv_blocks: int) -> EngineConfig:
    return EngineConfig(dtype="float32", role=role, limits=EngineLimits(num_kv_blocks, block_size=4))


@pytest.fixture
def pair(tiny_llama):
    config, sd = tiny_llama
    clock = FakeClock()
    pcfg = engine_config("prefill", 32)
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-0", clock)
    dengine = LLMEngine(config, sd, engine_config("decode", 16))
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    yield prefill, decode, clock
    decode.close()
    prefill.close()


def messages(worker) -> list:
    return [msg for _, msg in worker.step()]


def _prefill(prefill: PrefillWorker, reqs: list[PrefillRequest]) -> dict[str, Prefilled]:
    for r in reqs:
        prefill.submit(r)
    results = {}
    while len(results) < len(reqs):
        for res in messages(prefill):
            results[res.req_id] = res
    return results


def _decode_all(decode: DecodeWorker) -> dict[str, list]:
    outs: dict[str, list] = {}
    while decode.has_work():
        for o in messages(decode):
            outs.setdefault(o.req_id, []).append(o)
    return outs


def _tokens(msgs: list) -> list[int]:
    return [t for m in msgs if isinstance(m, Tokens) for t in m.token_ids]


def _decode_request(req: PrefillRequest, res: Prefilled, kv=None) -> DecodeRequest:
    params = SamplingParams(**{**req.params.__dict__, "seed": res.seed})
    return DecodeRequest(req.req_id, req.prompt_ids, res.first_token_id, params, kv or res.kv)


def test_disaggregated_tokens_equal_one_engine(tiny_llama, pair):
    prefill, decode, _ = pair
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 22)]
    reference = generate(LLMEngine(*tiny_llama, engine_config("both", 1024)), prompts, PARAMS)
    reqs = [PrefillRequest(f"r{i}", p, PARAMS) for i, p in enumerate(prompts)]
    results = _prefill(prefill, reqs)
    assert prefill.engine.stats().last_batch_size == 3          # batched in one prefill
    for req in reqs:
        # the messages cross as JSON: one codec, the descriptor nested
        decode.submit(decode_message(encode(_decode_request(req, results[req.req_id])), DecodeRequest))
    outs = _decode_all(decode)
    for i, req in enumerate(reqs):
        msgs = outs[req.req_id]
        assert isinstance(msgs[0], Accepted) and msgs[0].instance_id == "decode-0"
        assert [results[req.req_id].first_token_id] + _tokens(msgs) == reference[i]
        assert any(isinstance(m, Admitted) and m.kv_bytes > 0 for m in msgs)   # the hand-off is reported
        assert msgs[-1].finish_reason == "length"
    prefill.step()                                               # collects released leases
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


def test_pull_based_admission_waits_for_free_blocks(pair):
    prefill, decode, _ = pair
    # 16 decode blocks of 4 tokens; each request needs 4 prompt blocks (+ growth): not all fit.
    reqs = [PrefillRequest(f"r{i}", list(range(5, 21)), PARAMS) for i in range(5)]
    results = _prefill(prefill, reqs)
    for req in reqs:
        decode.submit(_decode_request(req, results[req.req_id]))
    decode.step()
    assert decode.engine.scheduler.remote, "some requests must wait in the prefill pool"
    assert prefill.stats()["leases"] == 5
    outs = _decode_all(decode)
    assert all(o[-1].finish_reason == "length" for o in outs.values())
    prefill.step()
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


def test_forged_and_stale_descriptors_are_rejected(pair):
    prefill, decode, _ = pair
    req = PrefillRequest("a", list(range(3, 12)), PARAMS)
    res = _prefill(prefill, [req])["a"]
    raw = res.kv.to_dict()
    forged = [{**raw, "lease_id": raw["lease_id"] ^ 1},
              {**raw, "pool_name": "distserve-kv-0-0123456789abcdef"}]
    for i, kv in enumerate(forged):
        decode.submit(_decode_request(PrefillRequest(f"bad{i}", req.prompt_ids, PARAMS), res,
                                      KVDescriptor.from_dict(kv)))
    outs = _decode_all(decode)
    assert all(isinstance(o[-1], Failed) and "KV hand-off failed" in o[-1].error for o in outs.values())
    for bad in ('{"type": "decode", "req_id": "x", "prompt_ids": [1], "first_token_id": 1, '
                '"params": {"seed": 1}, "kv": {"transport": "shm"}}', "not json"):
        with pytest.raises(ValueError):
            decode_message(bad, DecodeRequest)
    assert_no_leaks(decode.engine)
    # The real descriptor still works after the forgeries, then goes stale.
    decode.submit(_decode_request(req, res))
    assert _decode_all(decode)["a"][-1].finish_reason == "length"
    decode.submit(_decode_request(req, res))
    stale = _decode_all(decode)["a"][-1]
    assert isinstance(stale, Failed) and "lease" in stale.error.lower()
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
    assert not prefill.requests                                  # and out of the request table


def test_cancel_frees_kv_on_both_sides(pair):
    prefill, decode, _ = pair
    reqs = [PrefillRequest(f"r{i}", list(range(3, 15)), PARAMS) for i in range(2)]
    results = _prefill(prefill, reqs)
    decode.submit(_decode_request(reqs[0], results["r0"]))
    while not decode.engine.scheduler.running:
        decode.step()
    decode.step()
    assert decode.engine.blocks.num_used > 0
    decode.cancel("r0")
    prefill.cancel("r1")                                          # never reached decode
    assert [type(m) for m in messages(decode)] == [Failed]        # "cancelled", the last message
    assert messages(prefill) == []                                # already answered: nothing to send
    assert_no_leaks(decode.engine)
    assert_no_leaks(prefill.engine)
    assert not decode.requests and not prefill.requests


def test_decode_expects_a_split_request_until_it_arrives_or_is_cancelled(pair):
    prefill, decode, _ = pair
    reqs = [PrefillRequest(f"r{i}", list(range(3, 15)), PARAMS) for i in range(2)]
    decode.expect("r0", 11)                                       # routed here, prefilling
    decode.expect("r1", 11)
    decode.step()                                                 # drained on the step thread
    assert sorted(decode.engine.scheduler.expected) == ["r0", "r1"]
    decode.cancel("r1")                                           # its prefill failed
    decode.step()
    assert list(decode.engine.scheduler.expected) == ["r0"]
    results = _prefill(prefill, reqs[:1])
    decode.submit(_decode_request(reqs[0], results["r0"]))
    decode.step()
    assert decode.engine.scheduler.expected == {}                 # it arrived
    decode.expect("r0", 11)                                       # a late word: ignored
    assert _tokens(_decode_all(decode)["r0"]) and decode.engine.scheduler.expected == {}
    assert_no_leaks(decode.engine)


def test_bad_prefill_requests(pair):
    prefill, _, _ = pair
    with pytest.raises(ValueError, match="empty"):
        prefill.submit(PrefillRequest("a", [], PARAMS))
    with pytest.raises(ValueError):
        decode_message('{"type": "prefill", "req_id": "a", "prompt_ids": [1], "params": {"top_p": 2}}',
                       PrefillRequest)
    with pytest.raises(ValueError, match="unknown"):
        decode_message('{"type": "prefill", "req_id": "a", "prompt_ids": [1], "params": {"bogus": 1}}',
                       PrefillRequest)
    with pytest.raises(ValueError, match="expected a prefill message"):
        decode_message('{"type": "tokens", "req_id": "a", "token_ids": [1]}', PrefillRequest)
    prefill.submit(PrefillRequest("dup", [3, 4], PARAMS), ctx="first")
    prefill.submit(PrefillRequest("dup", [3, 4], PARAMS), ctx="second")
    outs = prefill.step()
    assert ("second", Failed("dup", "request id 'dup' is already in flight on prefill-0")) in outs


def test_a_lease_that_expires_while_waiting_for_decode_fails_the_request(pair):
    """Decode admission waits (pull-based) longer than the lease: the request must end with a
    clear error, not wait forever; the others finish."""
    prefill, decode, clock = pair
    reqs = [PrefillRequest(f"r{i}", list(range(5, 21)), PARAMS) for i in range(5)]
    results = _prefill(prefill, reqs)
    for req in reqs:
        decode.submit(_decode_request(req, results[req.req_id]))
    decode.step()
    waiting = {seq.req_id for seq in decode.engine.scheduler.remote}
    assert waiting
    clock.now += 6.0                        # past the 5 s lease
    prefill.step()                          # prefill reclaims the expired leases
    outs = _decode_all(decode)
    for rid in waiting:
        assert isinstance(outs[rid][-1], Failed) and "lease" in outs[rid][-1].error.lower(), outs[rid]
    prefill.step()
    assert_no_leaks(prefill.engine)
    assert_no_leaks(decode.engine)


class GatedImporter:
    """The real importer, with fetches that wait for the test to open a gate."""

    def __init__(self, inner) -> None:
        self.inner, self.gate, self.started = inner, threading.Event(), threading.Event()

    def fetch(self, desc, dst, skip_blocks=0):
        self.started.set()
        assert self.gate.wait(10)
        return self.inner.fetch(desc, dst, skip_blocks)

    def release(self, desc):
        self.inner.release(desc)

    def close(self):
        self.inner.close()


def test_the_running_batch_keeps_stepping_while_kv_is_copied_in(tiny_llama, pair):
    """Asynchronous admission: a copy in flight does not stall the running sequences; the new
    one joins at a step boundary once its KV is in; cancelling it mid-copy frees its blocks
    only after the copy ended."""
    prefill, _, _ = pair
    config, sd = tiny_llama
    dengine = LLMEngine(config, sd, engine_config("decode", 32))
    importer = GatedImporter(make_importer("shm", dengine.kv))
    decode = DecodeWorker(dengine, importer, "decode-1")
    try:
        reqs = [PrefillRequest(f"r{i}", list(range(3, 15)), PARAMS) for i in range(3)]
        results = _prefill(prefill, reqs)
        importer.gate.set()
        decode.submit(_decode_request(reqs[0], results["r0"]))
        while not dengine.scheduler.running:
            decode.step()
        importer.gate.clear()
        decode.submit(_decode_request(reqs[1], results["r1"]))
        decode.step()                                           # r1 admitted, its copy waits
        assert importer.started.wait(5) and [s.req_id for s in dengine.scheduler.loading] == ["r1"]
        steps = [messages(decode) for _ in range(3)]            # r0 decodes meanwhile
        assert all(any(isinstance(m, Tokens) and m.req_id == "r0" for m in s) for s in steps), steps
        assert dengine.scheduler.loading                        # r1 still loading
        decode.cancel("r1")
        assert [type(m) for m in messages(decode)].count(Failed) == 1
        assert len(dengine.scheduler.loading) == 1              # blocks held: the copy still writes
        importer.gate.set()
        outs = _decode_all(decode)
        assert "r1" not in outs and outs["r0"][-1].finish_reason == "length"
        assert_no_leaks(dengine)
    finally:
        importer.gate.set()
        decode.close()


def test_decode_mixed_steps_equal_one_engine(tiny_llama):
    """A decode instance with chunked prefill takes prompts too (adaptive disaggregation): they
    are prefilled in chunks inside its decode steps, beside sequences whose KV came from
    prefill, and every sequence's tokens equal one engine's doing both phases."""
    from backends.core.messages import GenerateRequest
    config, sd = tiny_llama
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 22, 13)]
    reference = generate(LLMEngine(config, sd, engine_config("both", 1024)), prompts, PARAMS)
    pcfg = engine_config("prefill", 32)
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-0")
    dcfg = EngineConfig(dtype="float32", role="decode", limits=EngineLimits(
        64, max_num_seqs=8, max_num_batched_tokens=8, block_size=4, chunked_prefill=True))
    dengine = LLMEngine(config, sd, dcfg)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    try:
        remote = [PrefillRequest(f"r{i}", prompts[i], PARAMS) for i in (0, 1)]
        results = _prefill(prefill, remote)
        for req in remote:
            decode.submit(_decode_request(req, results[req.req_id]))
        outs, mixed = {}, 0
        while not dengine.scheduler.running:        # until the remote ones are decoding
            for o in messages(decode):
                outs.setdefault(o.req_id, []).append(o)
        assert decode.stats()["running_context"] == sum(s.num_tokens for s in dengine.scheduler.running) > 0
        decode.submit(GenerateRequest("r2", prompts[2], PARAMS))
        decode.submit(GenerateRequest("r3", prompts[3], PARAMS))
        assert decode.stats()["backlog_tokens"] == 22 + 13
        while decode.has_work():
            for o in messages(decode):
                outs.setdefault(o.req_id, []).append(o)
            b = dengine.last_batch
            mixed += bool(b and b.num_decodes and len(b.seqs) > b.num_decodes)
        assert mixed >= 3, "the prompts' chunks rode in decode steps"
        for i, req in enumerate(remote):
            assert [results[req.req_id].first_token_id] + _tokens(outs[req.req_id]) == reference[i]
        for i in (2, 3):
            msgs = outs[f"r{i}"]
            assert _tokens(msgs) == reference[i]
            first = next(m for m in msgs if isinstance(m, Tokens))
            assert first.prefill_s is not None and first.prefill_s > 0    # TTFT's parts reported
        assert decode.stats()["backlog_tokens"] == 0
        prefill.step()
        assert_no_leaks(prefill.engine)
        assert_no_leaks(dengine)
    finally:
        decode.close()
        prefill.close()


def test_decode_cancels_a_local_prompt_mid_chunk_and_refuses_prompts_without_chunking(tiny_llama):
    from backends.core.messages import GenerateRequest
    config, sd = tiny_llama
    dcfg = EngineConfig(dtype="float32", role="decode", limits=EngineLimits(
        64, max_num_seqs=4, max_num_batched_tokens=4, block_size=4, chunked_prefill=True))
    dengine = LLMEngine(config, sd, dcfg)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    decode.submit(GenerateRequest("long", list(range(3, 30)), PARAMS))
    decode.step()
    decode.step()                                   # two 4-token chunks in
    assert dengine.blocks.num_used > 0
    decode.cancel("long")
    assert [type(m) for m in messages(decode)] == [Failed]
    assert_no_leaks(dengine)
    assert decode.stats()["backlog_tokens"] == 0
    decode.close()
    plain = LLMEngine(config, sd, engine_config("decode", 16))
    worker = DecodeWorker(plain, make_importer("shm", plain.kv), "decode-1")
    with pytest.raises(ValueError, match="decode-1 takes no prompts: local prefill needs"):
        worker.submit(GenerateRequest("x", [1, 2, 3], PARAMS))
    worker.close()


def test_a_blocked_prefill_worker_reports_no_progress_and_its_loop_does_not_spin(tiny_llama):
    """Prefill's KV all lent to decode and a prompt waiting: the step can run nothing, says so,
    and the loop waits (woken, or every idle_s) instead of spinning on the core."""
    import time as _time
    from backends.core.worker_loop import WorkerLoop
    config, sd = tiny_llama
    pcfg = engine_config("prefill", 8)                  # 8 blocks of 4 tokens
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=60.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-0")
    try:
        _prefill(prefill, [PrefillRequest("held", list(range(3, 31)), PARAMS)])   # 7 blocks lent
        prefill.submit(PrefillRequest("waits", list(range(3, 20)), PARAMS))     # needs 5
        assert prefill.step() == [] and prefill.progressed is False
        steps = [0]
        real_step = prefill.step

        def counted():
            steps[0] += 1
            return real_step()
        prefill.step = counted
        loop = WorkerLoop(prefill, emit=lambda out: None, idle_s=0.05)
        loop.start()
        _time.sleep(0.5)
        stalled = loop.stalled_s()                      # work held, nothing ran: the watchdog's
        loop.stop()
        assert steps[0] < 40, f"{steps[0]} steps in 0.5 s: the loop spins"
        assert stalled >= 0.4
    finally:
        prefill.close()


def test_decode_mixed_steps_keep_to_the_step_budget_the_router_sizes(tiny_llama):
    """Adaptive mode: each mixed step carries the decodes plus the prompt tokens that keep its
    predicted time within the TPOT SLO (router.step_budget), not the standing 64-token budget."""
    from backends.core.messages import GenerateRequest
    from backends.core.router import step_budget
    from tests.test_router import Linear
    config, sd = tiny_llama
    predictor, tpot = Linear(), 0.0125                # room for ~15 prompt tokens beside 1 decode
    dcfg = EngineConfig(dtype="float32", role="decode", limits=EngineLimits(
        64, max_num_seqs=4, max_num_batched_tokens=64, block_size=4, chunked_prefill=True))
    dengine = LLMEngine(config, sd, dcfg)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0",
                          step_budget=lambda s: step_budget(s, predictor, tpot))
    try:
        decode.submit(GenerateRequest("a", list(range(3, 8)), PARAMS))
        messages(decode)                            # a's 5-token prompt, then it decodes
        decode.submit(GenerateRequest("b", list(range(3, 50)), PARAMS))
        chunks = []
        while decode.has_work():
            messages(decode)
            b = dengine.last_batch
            if b is not None and len(b.seqs) > b.num_decodes:
                n, ctx = b.num_decodes, sum(q.num_tokens for q in b.seqs[:b.num_decodes])
                chunk = sum(b.num_new[b.num_decodes:])
                chunks.append(chunk)
                assert predictor.mixed_step_time(n, ctx - n, chunk) <= tpot + 1e-9 or chunk == 1
        assert len(chunks) >= 3 and max(chunks) < 47, chunks       # b's prompt went in pieces
        assert_no_leaks(dengine)
    finally:
        decode.close()


def test_decode_worker_publishes_its_running_sequences_tpot_slack(tiny_llama):
    """Adaptive mode (a TPOT SLO given): stats() carries the slack the running batch banked
    (backends.core.tpot_slack) for the status page; a local prompt's first token stamps its TPOT clock."""
    from backends.core.messages import GenerateRequest
    from backends.core.tpot_slack import MAX_SLACK_SLOS, SLACK_SHARE
    config, sd = tiny_llama
    now = [100.0]
    dcfg = EngineConfig(dtype="float32", role="decode", limits=EngineLimits(
        64, max_num_seqs=4, max_num_batched_tokens=64, block_size=4, chunked_prefill=True))
    dengine = LLMEngine(config, sd, dcfg)
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0",
                          clock=lambda: now[0], tpot_slo=0.05)
    plain = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-1")
    try:
        decode.submit(GenerateRequest("a", list(range(3, 8)), PARAMS))
        assert decode.stats()["tpot_slack_s"] == 0.0               # nothing decoding yet
        for _ in range(4):                                          # prefill, then 3 decodes
            decode.step()
        seq = dengine.seqs["a"]
        assert seq.first_token_time == 100.0 and seq.num_output_tokens == 4
        now[0] = 100.05                                             # 3 gaps in 50 ms: 0.1 s banked
        assert decode.stats()["tpot_slack_s"] == pytest.approx(            # capped at one SLO
            min(SLACK_SHARE * (0.05 * 3 - 0.05), MAX_SLACK_SLOS * 0.05))
        assert plain.stats()["tpot_slack_s"] == 0.0                 # no SLO: none published
    finally:
        decode.close()
        plain.close()
