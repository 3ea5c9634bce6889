"""Speculative decoding served (backends/core/spec_policy.py: Speculator, AdaptiveK): the
adaptive k policy on made-up costs and acceptance, the decode and colocated workers with
speculation (the very tokens of plain decoding, nothing held after finish or cancel), the
deployment fields, and stop strings over multi-token outputs."""
from __future__ import annotations

import dataclasses

import pytest

from backends.colocated.worker import ColocatedWorker
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.messages import DecodeRequest, Failed, GenerateRequest, PrefillRequest, Tokens
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch
from backends.core.sequence import Sequence
from backends.core.spec_decode import NgramDrafter
from backends.core.spec_policy import AdaptiveK, StepCost
from backends.core.speculator import Speculator, make_speculator
from backends.core.worker import num_prompt_tokens
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillWorker
from deploy.deployment import Deployment, PhaseSpec, default_deployment
from kvtransfer import make_exporter, make_importer
from tests.helpers import assert_no_leaks

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
PROMPTS = [list(range(3, 13)) * 3, list(range(40, 47)), [9, 8, 7, 9, 8, 7, 9, 8]]
# batch-1 step seconds by rows, as measured on this CPU (commit 56d0142): 5 rows leave the int4 kernel
MEASURED = {1: 0.023, 2: 0.0258, 3: 0.030, 4: 0.0356, 5: 0.0509}

pytestmark = pytest.mark.usefixtures("one_thread")


def measured_policy(max_k: int = 4, **kw) -> AdaptiveK:
    policy = AdaptiveK(max_k, **kw)
    for n, s in list(MEASURED.items()) * 2:                 # each n's first step: a warm-up
        policy.observe_step(n, s)
    return policy


def chosen_k(policy: AdaptiveK, req_id: str = "a") -> int:
    want = policy.want([req_id])
    proposal = {req_id: [7] * want[req_id]} if want.get(req_id) else {}
    return len(policy.choose(proposal, 1).get(req_id, []))


# -- the policy ------------------------------------------------------------------------------
def test_step_cost_interpolates_and_extrapolates_measured_steps():
    cost = StepCost(prior_row_cost=0.2)
    assert cost.estimate(3) / cost.estimate(1) == pytest.approx(1.4)        # the prior alone
    cost.observe(2, 0.5)                                                   # warm-up: not counted
    assert cost.estimate(3) / cost.estimate(1) == pytest.approx(1.4)
    cost.observe(2, 0.02)
    assert cost.estimate(4) == pytest.approx(0.02 * 1.6 / 1.2)             # prior through one point
    cost.observe(6, 0.04)
    cost.observe(6, 0.04)
    assert cost.estimate(4) == pytest.approx(0.03)                         # between two
    assert cost.estimate(8) == pytest.approx(0.05)                         # their slope beyond
    cost.observe(6, 1.0)                                                   # a spike moves it 20% at most
    assert cost.estimate(6) == pytest.approx(0.04 + 0.2 * 0.04)


def test_k_follows_acceptance_and_avoids_the_slow_five_row_step():
    policy = measured_policy(max_k=4)
    for _ in range(20):                                     # every draft token accepted
        policy.want(["a"])
        policy.record("a", 4, 4)
    high = chosen_k(policy)
    assert high == 3, "k=4 makes a 5-row step (51 ms): 3 tokens at 36 ms pay better"
    policy = measured_policy(max_k=4)
    for _ in range(20):                                     # about half the first tokens accepted
        policy.want(["a"])
        policy.record("a", 2, 1)
        policy.record("a", 2, 0)
    assert 1 <= chosen_k(policy) < high
    for _ in range(20):                                     # drafts never accepted: plain steps
        policy.want(["a"])
        policy.record("a", 1, 0)
    assert policy.want(["a"]) == {} and policy.choose({}, 1) == {}


@pytest.mark.parametrize("row_s, pays", [(0.0005, True), (0.05 / 16, False)],
                         ids=["memory-bound", "compute-bound"])
def test_at_a_large_batch_modest_acceptance_pays_only_where_rows_are_cheap(row_s, pays):
    policy = AdaptiveK(3)
    ids = [f"r{i}" for i in range(16)]
    for n in list(range(16, 64)) * 2:       # a 16-row step 50 ms; a row ~1% of it, or 1/16
        policy.observe_step(n, 0.05 + row_s * (n - 16))
    for _ in range(10):
        policy.want(ids)
        for r in ids:
            policy.record(r, 3, 1)
    drafts = policy.choose({r: [5, 6, 7] for r in policy.want(ids)}, len(ids))
    if pays:
        assert len(drafts) == 16 and sum(map(len, drafts.values())) >= 16
    else:
        assert drafts == {}


def test_a_sequence_left_out_is_probed_and_picked_up_when_it_turns_repetitive():
    policy = measured_policy(max_k=3, probe_every=8)

    def step(accepts: set[str]) -> dict[str, list[int]]:
        want = policy.want(["a", "b"])
        drafts = policy.choose({r: [4] * k for r, k in want.items()}, 2)
        for r, d in drafts.items():
            policy.record(r, len(d), len(d) if r in accepts else 0)
        return drafts

    for _ in range(20):                                       # nothing accepted: plain steps ...
        step(set())
    rows = [step(set()) for _ in range(32)]
    assert all(len(d) <= 1 and all(len(x) == 1 for x in d.values()) for d in rows)
    probed = [r for d in rows for r in d]
    assert 4 <= len(probed) <= 10 and set(probed) == {"a", "b"}    # ... but a 1-token probe
    waited = 0                                                # each about every probe_every steps
    while step({"a"}).get("a") is None:                       # "a" turns repetitive
        waited += 1
    assert waited <= 9
    assert [len(step({"a"})["a"]) for _ in range(2)] == [2, 1]    # a ramp, then the cost rule
    for _ in range(10):
        step({"a"})
    # 2 rows + 2 drafts = 4 rows (36 ms); a 3rd draft would make the 5-row step (51 ms)
    assert len(step({"a"})["a"]) == 2 and "b" not in policy.want(["a", "b"])


def test_a_scored_draft_is_judged_by_its_evidence_not_by_the_sequences_last_rejections():
    """n-gram drafts are bursty: rejections after short matches must not shut out the long
    match that follows; and a class of evidence whose drafts keep failing stops being drafted."""
    policy = measured_policy(max_k=4)

    def k(evidence: int, req_id: str = "a") -> int:
        assert policy.want([req_id], scored=True) == {req_id: 4}    # asked for every sequence
        return len(policy.choose({req_id: [7] * 4}, 1, {req_id: evidence}).get(req_id, []))

    assert k(12, "fresh") >= 2 and k(2, "fresh") <= 1
    for _ in range(4):                                              # short matches, rejected
        k(2)
        policy.record("a", 1, 0, evidence=2)
    assert k(2) == 0                                                # the next short one: plain
    assert k(12) >= 1                                               # a long one is verified
    for _ in range(30):                                             # long ones failing, too
        policy.record("a", 2, 0, evidence=12)
    assert k(12) == 0
    assert policy.acceptance("a", 12) < 0.2 < AdaptiveK(4).acceptance("a", 12)


def test_the_speculator_passes_the_ngram_drafts_scores_to_the_policy():
    repeat = [5, 6, 7, 8, 5, 6, 7]                        # "5 6 7" again: the drafter proposes 8
    seq = Sequence("s", repeat, SamplingParams(max_tokens=8, temperature=0))
    seq.num_cached = len(repeat) - 1
    spec = make_speculator("ngram", 3)
    assert spec.scored and spec.drafts([seq]) == {"s": [8, 5, 6]}
    assert spec._evidence == {"s": 3}
    assert set(spec.source._drafts._indexes) == {"s"}     # its n-gram index, kept between steps
    seq.append_token(8)
    seq.num_cached += 1
    assert spec.drafts([seq]) == {"s": [5, 6, 7]} and spec._evidence == {"s": 4}
    spec.forget("s")                                      # finished or cancelled: dropped
    assert not spec.source._drafts._indexes


def test_the_deployment_turns_the_draft_corpus_off_in_both_placements(monkeypatch):
    """decode.draft_corpus (on by default, left out of the JSON): the in-process drafter's and
    the drafter process's options."""
    import json

    import backends.draft as draft
    monkeypatch.setattr(draft, "RemoteDrafter", lambda spec: spec)      # the spec, no process
    dep = default_deployment()
    assert dep.decode.draft_corpus and "draft_corpus" not in dep.to_dict()["decode"]
    off = dataclasses.replace(dep, decode=dataclasses.replace(dep.decode, speculative="ngram",
                                                              draft_corpus=False))
    assert off.to_dict()["decode"]["draft_corpus"] is False
    assert Deployment.from_dict(off.to_dict()).decode.draft_corpus is False
    assert make_speculator("ngram", 3).source.drafter.corpus is not None
    assert make_speculator("ngram", 3, drafter_options={"cross_request": False}).source.drafter.corpus is None
    spec = draft.remote_drafter("ngram", 3, (0,), 100, 64, {"cross_request": False})
    assert json.loads(spec.options) == {"cross_request": False}
    with pytest.raises(ValueError, match="draft_corpus"):
        dataclasses.replace(dep.decode, draft_corpus="yes")


def test_policy_keeps_only_the_decoding_sequences():
    policy = AdaptiveK(2)
    policy.want(["a", "b"])
    policy.want(["b"])
    assert set(policy.seqs) == {"b"}
    policy.forget("b")
    assert not policy.seqs
    with pytest.raises(ValueError, match="unknown drafter"):
        make_speculator("eagle", 3)


def test_sequences_under_penalties_or_bans_get_no_draft():
    repeat = [5, 6, 7, 5, 6, 7, 5, 6]                     # the n-gram drafter proposes 7, 5, 6
    plain = Sequence("plain", repeat, SamplingParams(max_tokens=8, temperature=0))
    penalized = Sequence("pen", repeat, SamplingParams(max_tokens=8, temperature=0,
                                                       repetition_penalty=1.3))
    for s in (plain, penalized):
        s.num_cached = len(repeat) - 1                    # decoding next
    drafts = make_speculator("ngram", 3).drafts([plain, penalized])
    assert drafts.get("plain") and "pen" not in drafts


# -- the workers -----------------------------------------------------------------------------
class OracleDrafter:
    """Proposes the known continuation `full` (prompt -> outputs): every draft accepted, or
    (`wrong`) each token shifted by one: never accepted."""

    def __init__(self, full: dict[tuple, list[int]], wrong: bool = False) -> None:
        self.full, self.wrong = full, wrong

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        for prompt, out in self.full.items():
            if tuple(token_ids[:len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                return [(t + self.wrong) % 128 for t in out[done:done + k]]
        return []


def engine_config(role: str) -> EngineConfig:
    return EngineConfig(dtype="float32", role=role, limits=EngineLimits(64, block_size=4))


@pytest.fixture
def system(tiny_llama):
    """decode(speculator) -> (prompt, params) -> (first token + decoded tokens, messages)."""
    config, sd = tiny_llama
    pcfg = engine_config("prefill")
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-0")
    workers = [prefill]

    def make_decode(speculator):
        engine = LLMEngine(config, sd, engine_config("decode"))
        worker = DecodeWorker(engine, make_importer("shm", engine.kv), "decode-0",
                              clock=lambda: 0.0, speculator=speculator)   # costs: the prior
        workers.append(worker)
        return worker

    yield prefill, make_decode
    for w in workers:
        w.close()


def handed_off(prefill: PrefillWorker, prompts: list[list[int]], params: SamplingParams):
    prefill.step()                                  # the leases decode took before: reclaimed
    for i, p in enumerate(prompts):
        prefill.submit(PrefillRequest(f"r{i}", p, params))
    results = {}
    while len(results) < len(prompts):
        for _, res in prefill.step():
            results[res.req_id] = res
    return [DecodeRequest(f"r{i}", p, results[f"r{i}"].first_token_id,
                          dataclasses.replace(params, seed=results[f"r{i}"].seed), results[f"r{i}"].kv)
            for i, p in enumerate(prompts)]


def decode_all(worker, reqs) -> dict[str, list[int]]:
    for r in reqs:
        worker.submit(r)
    out = {r.req_id: [r.first_token_id] if isinstance(r, DecodeRequest) else [] for r in reqs}
    while worker.has_work():
        for _, msg in worker.step():
            if isinstance(msg, Tokens):
                out[msg.req_id] += msg.token_ids
            assert not isinstance(msg, Failed), msg
    return out


def assert_nothing_held(worker) -> None:
    assert_no_leaks(worker.engine)
    assert not worker.requests
    assert not worker.speculator.policy.seqs


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_decode_with_speculation_gives_the_tokens_of_plain_decoding(system, params):
    prefill, make_decode = system
    plain = decode_all(make_decode(None), handed_off(prefill, PROMPTS, params))
    full = {tuple(p): plain[f"r{i}"] for i, p in enumerate(PROMPTS)}
    for drafter in (NgramDrafter(), OracleDrafter(full), OracleDrafter(full, wrong=True)):
        decode = make_decode(Speculator(drafter, AdaptiveK(3)))
        assert decode_all(decode, handed_off(prefill, PROMPTS, params)) == plain, drafter
        stats = decode.stats()
        if isinstance(drafter, OracleDrafter) and not drafter.wrong:
            assert stats["spec_accepted"] == stats["spec_proposed"] > 0
            assert stats["spec_emitted"] > stats["spec_verify_rows"] * 2     # several tokens a step
            assert stats["tokens_per_step"] > 1.5           # the yield the router divides by
        if isinstance(drafter, OracleDrafter) and drafter.wrong:
            assert stats["spec_accepted"] == 0 and stats["spec_verify_rows"] > 0
            assert 1.0 <= stats["tokens_per_step"] < 1.1
            assert stats["spec_verify_rows"] <= 8, "drafts that never pay were not switched off"
        assert_nothing_held(decode)
    prefill.step()
    assert_no_leaks(prefill.engine)


def test_cancel_mid_speculation_frees_everything(system):
    prefill, make_decode = system
    plain = decode_all(make_decode(None), handed_off(prefill, PROMPTS[:1], GREEDY))["r0"]
    [req] = handed_off(prefill, PROMPTS[:1], GREEDY)
    decode = make_decode(Speculator(OracleDrafter({tuple(PROMPTS[0]): plain}), AdaptiveK(3)))
    decode.submit(req)
    while not decode.stats()["spec_steps"]:
        decode.step()
    assert decode.speculator.policy.seqs and decode.engine.blocks.num_used
    decode.cancel("r0")
    assert [type(m) for _, m in decode.step()] == [Failed]
    assert_nothing_held(decode)
    prefill.step()
    assert_no_leaks(prefill.engine)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prompts", "chunked"])
def test_colocated_with_speculation_gives_the_tokens_of_plain_decoding(tiny_llama, chunked):
    """Chunked: 16-token steps mix prompt chunks, decode rows and verify rows."""
    limits = EngineLimits(64, max_num_seqs=8, max_num_batched_tokens=16, block_size=4,
                          chunked_prefill=True) if chunked else EngineLimits(64, block_size=4)

    def run(speculator):
        engine = LLMEngine(*tiny_llama, EngineConfig(dtype="float32", role="both", limits=limits))
        worker = ColocatedWorker(engine, "colocated-0", speculator=speculator)
        return worker, decode_all(worker, [GenerateRequest(f"r{i}", p, GREEDY)
                                           for i, p in enumerate(PROMPTS)])
    _, plain = run(None)
    worker, spec = run(make_speculator("ngram", 3))
    assert spec == plain
    assert worker.stats()["spec_verify_rows"] > 0
    assert_nothing_held(worker)


def test_verify_rows_are_not_counted_as_prompt_tokens():
    seqs = [Sequence(f"s{i}", [1, 2, 3], GREEDY) for i in range(3)]
    batch = Batch(seqs, [1, 4, 10], [True, True, False], num_decodes=1, drafts={seqs[1]: [5, 6, 7]})
    assert num_prompt_tokens(batch) == 10          # the prefill chunk only, not 1 + 3 verify rows


# -- the deployment and the front end ----------------------------------------------------------
def test_speculation_is_a_decode_field_rendered_only_when_on():
    base = default_deployment(num_cores=2)
    assert "speculative" not in base.to_json()                # the committed configs stay as they are
    on = dataclasses.replace(base, decode=dataclasses.replace(base.decode, speculative="ngram",
                                                              num_speculative_tokens=4))
    again = Deployment.from_json(on.to_json(), check_host=False)
    assert again == on and again.decode.speculative == "ngram" and again.decode.num_speculative_tokens == 4
    with pytest.raises(ValueError, match="speculative must be null or one of"):
        PhaseSpec(speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer in"):
        PhaseSpec(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative is null"):
        PhaseSpec(num_speculative_tokens=5)
    with pytest.raises(ValueError, match="prefill.speculative"):
        dataclasses.replace(base, prefill=dataclasses.replace(base.prefill, speculative="ngram"))


def test_a_stop_string_inside_a_verified_draft_drops_the_tokens_after_it(smollm_tokenizer):
    from backends.core.output import RequestOutputProcessor
    from backends.orchestrator.pipeline import Generation, _Output
    tok = smollm_tokenizer
    ids = tok.encode("one two three four five", add_special_tokens=False)
    gen = Generation("g", [1], SamplingParams(stop=(" three",)), stream=False)
    out = _Output(gen, RequestOutputProcessor(tok, gen.params.stop))
    assert out.add(ids)                                       # one message: the whole draft
    assert out.proc.text == "one two"
    assert tok.decode(out.tokens).startswith("one two three") and len(out.tokens) < len(ids)
