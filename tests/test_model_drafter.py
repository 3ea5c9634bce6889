"""A draft model as the drafter (backends/core/model_drafter.py): it proposes its own greedy
continuation, batched for several sequences; a decode instance speculating with it (in its own
process or in a drafter process) gives the very tokens of plain decoding, greedy and seeded,
whether the draft model is the target itself or another; nothing is held after, in either
engine; the deployment names it with `speculative: model` and `draft_model`."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from backends.core.engine import LLMEngine
from backends.core.model_drafter import ModelDrafter
from backends.core.spec_decode import DRAFTERS, KeyedDrafts
from backends.core.sequence import Sequence
from backends.core.spec_policy import AdaptiveK
from backends.core.speculator import Speculator
from backends.core.weights import load_checkpoint
from backends.draft import remote_speculator
from backends.draft.protocol import Frame, Kind
from backends.draft.server import DraftServer
from backends.serving.host import _speculator
from deploy.deployment import PhaseSpec, default_deployment
from tests.helpers import GREEDY, assert_no_leaks, generate, make_engine, save_tiny_hf_model
from tests.test_spec_worker import PROMPTS, SEEDED, assert_nothing_held, decode_all, handed_off, system  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The tiny Llama of conftest's tiny_llama (seed 0), saved where a drafter can load it."""
    path = tmp_path_factory.mktemp("draft_tiny")
    save_tiny_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Another tiny Llama (other random weights, the same vocabulary): a draft model that is
    not the target, so some drafts are rejected."""
    path = tmp_path_factory.mktemp("draft_other")
    save_tiny_hf_model("llama", path, seed=1)
    return load_checkpoint(path, torch.float32)


def drafter_of(model, **kw) -> ModelDrafter:
    return ModelDrafter(engine=make_engine(*model, num_kv_blocks=64, block_size=4), **kw)


def test_it_proposes_its_greedy_continuation_and_batches_without_changing_it(tiny_llama):
    target = make_engine(*tiny_llama, num_kv_blocks=64, block_size=4)
    expected = generate(target, PROMPTS, dataclasses.replace(GREEDY, max_tokens=5))
    drafter = drafter_of(tiny_llama)
    assert [drafter.propose(p, 5) for p in PROMPTS] == expected
    assert drafter.propose_many(PROMPTS, 5) == expected          # one set of shared steps
    assert drafter.propose_many([p + e[:2] for p, e in zip(PROMPTS, expected)], 3) == \
        [e[2:5] for e in expected]                               # a history grown by accepted tokens
    assert drafter.engine.stats().prefix.num_hit_tokens > 0          # ...reuses its cached blocks
    assert_no_leaks(drafter.engine)


def test_what_it_cannot_hold_gets_no_draft_and_holds_nothing(tiny_llama):
    drafter = drafter_of(tiny_llama)
    limit = drafter.engine.max_model_len
    out = drafter.propose_many([[], list(range(5, 25)) * (limit // 20 + 1), [500], PROMPTS[1]], 4)
    assert out[:3] == [[], [], []] and len(out[3]) == 4           # empty, too long, out of vocab
    near_end = [3] * (limit - 2)                                  # room for 2 tokens only
    assert len(drafter.propose(near_end, 4)) == 2
    assert drafter.propose(PROMPTS[0], 0) == []
    assert_no_leaks(drafter.engine)


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        drafter_of(tiny_llama, vocab_size=49152)
    with pytest.raises(ValueError, match="path or an engine"):
        ModelDrafter()
    decode_engine = LLMEngine(*tiny_llama, dataclasses.replace(
        make_engine(*tiny_llama).config, role="decode"))
    with pytest.raises(ValueError, match="role 'both'"):
        ModelDrafter(engine=decode_engine)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_decode_speculating_with_a_draft_model_gives_the_tokens_of_plain_decoding(
        system, tiny_llama, other_tiny, params):  # noqa: F811
    prefill, make_decode = system
    plain = decode_all(make_decode(None), handed_off(prefill, PROMPTS, params))
    for model, exact in ((tiny_llama, True), (other_tiny, False)):
        drafter = drafter_of(model)
        decode = make_decode(Speculator(drafter, AdaptiveK(3)))
        assert decode_all(decode, handed_off(prefill, PROMPTS, params)) == plain
        stats = decode.stats()
        assert stats["spec_verify_rows"] > 0
        if exact and params is GREEDY:            # the target drafting for itself: all accepted
            assert stats["spec_accepted"] == stats["spec_proposed"]
            assert stats["tokens_per_step"] > 1.5
        if not exact:
            assert stats["spec_accepted"] < stats["spec_proposed"]
        assert_nothing_held(decode)
        assert_no_leaks(drafter.engine)
    prefill.step()
    assert_no_leaks(prefill.engine)


def test_the_drafter_process_drafts_with_a_model_in_one_batch(tiny_llama, tiny_path):
    """DraftServer hands every updated sequence to the draft model at once."""
    calls = []
    drafter = drafter_of(tiny_llama)
    many = drafter.propose_many
    drafter.propose_many = lambda histories, k: calls.append(len(histories)) or many(histories, k)
    server = DraftServer(drafter, num_draft=3, max_len=256)
    frames = [Frame(Kind.RESET, sid, 0, p) for sid, p in enumerate(PROMPTS)]
    out = server.handle(frames)
    assert calls == [3] and [f.kind for f in out] == [Kind.PROPOSAL] * 3
    assert [f.tokens for f in out] == [KeyedDrafts(drafter_of(tiny_llama)).propose(i, p, 3)[0]
                                       for i, p in enumerate(PROMPTS)]


def test_a_draft_model_in_its_own_process_gives_the_tokens_of_plain_decoding(system, tiny_path):  # noqa: F811
    prefill, make_decode = system
    plain = decode_all(make_decode(None), handed_off(prefill, PROMPTS, GREEDY))
    spec = remote_speculator("model", 3, (0,), 128, 256, {"model": str(tiny_path), "dtype": "float32",
                                                          "num_kv_blocks": 64})
    assert spec.source.wait_up(60.0)
    decode = make_decode(spec)
    assert decode_all(decode, handed_off(prefill, PROMPTS, GREEDY)) == plain
    assert_nothing_held(decode)
    spec.close()


def test_the_deployment_names_a_draft_model_and_the_host_builds_it(tiny_path):
    with pytest.raises(ValueError, match="name both or neither"):
        PhaseSpec(speculative="model")
    with pytest.raises(ValueError, match="name both or neither"):
        PhaseSpec(speculative="ngram", draft_model="small.gguf")
    assert "model" in DRAFTERS
    base = default_deployment()
    decode = dataclasses.replace(base.decode, speculative="model", draft_model=str(tiny_path))
    dep = dataclasses.replace(base, decode=decode)
    assert dep.to_dict()["decode"]["draft_model"] == str(tiny_path)
    assert "draft_model" not in base.to_dict()["decode"]
    speculator = _speculator(dep, dep.decode, 0, 128)
    assert isinstance(speculator.source.drafter, ModelDrafter)
    assert speculator.source.drafter.engine.config.limits.num_kv_blocks == decode.num_kv_blocks
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        _speculator(dep, dep.decode, 0, 49152)


@pytest.mark.parametrize("draft_s, pays", [(0.0001, True), (0.05, False)])
def test_drafting_time_is_weighed_apart_from_the_step(draft_s, pays):
    """A drafter whose passes cost more than the tokens they save is asked no more (probes
    spaced to a small share of the time); one that costs little is asked at every step.
    Steps: 6 ms plain, 10 ms verifying 4 draft tokens; every draft accepted."""
    clock = [0.0]

    class TimedDrafter:                       # proposes what the target will take, in draft_s
        def propose(self, token_ids, k):
            clock[0] += draft_s
            return [7] * k

    policy = AdaptiveK(4, prior_accept=0.95)
    for n, s in ((1, 0.006), (5, 0.010)):
        for _ in range(3):
            policy.observe_step(n, s)
    spec = Speculator(TimedDrafter(), policy, clock=lambda: clock[0])
    seq = Sequence("a", [1, 2, 3], GREEDY, output_ids=[4])
    seq.num_cached = 3
    asked = sum(bool(spec.drafts([seq])) for _ in range(40))
    assert (asked == 40) if pays else (1 <= asked <= 2), asked
    assert policy.draft_token_s == pytest.approx(draft_s / 4)


def test_a_draft_model_is_timed_when_the_speculator_starts(tiny_llama):
    """Its costs are learnt from calibration calls before any real sequence asks (a long
    prompt's first call is a prefill: in a decode step, before the policy knows its cost): a
    backlog token's and a token of k's, each > 0, and the backlog rate is what a 256-token
    prefill took over 256; the calls leave no sequence behind in the draft engine."""
    ticks = itertools.count(0, 1e-3)
    drafter = drafter_of(tiny_llama)
    calls = drafter.calibrate(3, ticks.__next__)
    assert [(k, backlog) for k, _, backlog in calls] == [(3, 256), (3, 1)]
    assert all(seconds > 0 for _, seconds, _ in calls)
    assert_no_leaks(drafter.engine)
    policy = AdaptiveK(3)
    Speculator(drafter, policy)
    assert policy.draft_token_s > 0 and policy.backlog_token_s > 0
    plain = AdaptiveK(3)                       # a drafter with no calibration: nothing learnt yet
    Speculator(DRAFTERS["ngram"](), plain)
    assert plain.draft_token_s is None and plain.backlog_token_s is None


def test_until_drafting_is_timed_only_one_sequence_is_asked():
    """A draft model's first call for a sequence prefills its prompt: before any call is timed,
    a step asks the drafter for one sequence, not the whole batch; a cheap one is then asked for all."""
    asked: list[int] = []

    class CountingDrafter:
        def propose_many(self, histories, k):
            asked.append(len(histories))
            return [[7] * k for _ in histories]

        def propose(self, token_ids, k):
            return self.propose_many([token_ids], k)[0]

    spec = Speculator(CountingDrafter(), AdaptiveK(3), clock=itertools.count(0, 1e-4).__next__)
    seqs = []
    for i in range(4):
        s = Sequence(f"s{i}", [1, 2, 3], GREEDY, output_ids=[4])
        s.num_cached = 3
        seqs.append(s)
    spec.drafts(seqs)
    spec.drafts(seqs)
    assert asked == [1, 4]


def test_a_drafter_that_never_has_a_draft_is_left_to_probes_and_told_nothing():
    """A drafter process too slow to keep up (every proposal late) answers nothing: after a
    few empty answers a sequence is asked only by probes, and the drafter is no longer sent its
    tokens, so it idles instead of computing drafts no step will use."""
    from backends.core.spec_policy import EMPTY_ASKS

    class LateSource:                          # a DraftSource whose proposals never align
        def __init__(self):
            self.updates: list[list[str]] = []

        def draft(self, seq, k):
            return []

        def update(self, seqs):
            self.updates.append([q.req_id for q in seqs])

        def forget(self, req_id): ...

        def stats(self): return {}

        def close(self): ...

    source = LateSource()
    spec = Speculator(source, AdaptiveK(3, probe_every=1000))
    seq = Sequence("a", [1, 2, 3], GREEDY, output_ids=[4])
    seq.num_cached = 3
    for _ in range(EMPTY_ASKS + 3):
        assert spec.drafts([seq]) == {}
    told = [u for u in source.updates if u]
    assert len(told) == EMPTY_ASKS               # then nothing: it is left to probes
    assert not spec.policy.asking("a")
