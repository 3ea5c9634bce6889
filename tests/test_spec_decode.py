"""Speculative decoding (backends/core/spec_decode.py): the n-gram drafter, lossless acceptance
(greedy and seeded sampling give the very tokens of plain decoding; the sampling rule for a
draft distribution reproduces the target's, by chi-square), KV roll-back without leaks, and
stop criteria on accepted tokens. What a costly drafter's calls cost (spec_policy.py): per
token of k and per backlog token (a draft model computes a sequence's unseen tokens first),
learnt apart; new sequences with long prompts are not prefilled for a drafter that does not
pay, its probes stay within PROBE_SHARE, and one that pays is still asked for every sequence."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from backends.core.sampling import SamplingParams, _mix, _sample_row
from backends.core.sequence import Sequence
from backends.core.spec_decode import (MAX_EVIDENCE, NgramDrafter, SpecStats, TokenCorpus, accept_draft,
                                       accept_with_probs, propose_drafts, target_probs)
from backends.core.spec_policy import PROBE_SHARE, AdaptiveK
from backends.core.speculator import Speculator
from tests.helpers import GREEDY, assert_no_leaks, generate, make_engine

REPETITIVE = ("Alice sent the report to Bob on Monday. Bob read the report and sent it to Carol. "
              "Carol read the report and sent it to Dave. Dave read the report and sent it to")
TEXTS = [REPETITIVE, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
         "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
SAMPLED = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
CHI2_CRITICAL_DF7 = 24.32           # chi-square, 7 degrees of freedom, p = 0.001

pytestmark = pytest.mark.usefixtures("one_thread")


class OracleDrafter:
    """Proposes the known continuation `full` (every draft accepted), or `wrong` tokens."""

    def __init__(self, full: list[int], wrong: int | None = None) -> None:
        self.full, self.wrong = full, wrong

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        if self.wrong is not None:
            return [self.wrong] * k
        return self.full[len(token_ids):len(token_ids) + k]


def run_spec(engine, drafter, k: int = 4) -> dict[str, list[int]]:
    """Run to completion, drafting before every step; check the block invariant after each."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        drafts = propose_drafts(engine.scheduler.running, drafter, k)
        for out in engine.step(drafts=drafts):
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        assert_blocks_match_cache(engine)
    return tokens


def assert_blocks_match_cache(engine) -> None:
    """A decoding sequence holds blocks for its cached tokens only: rejected drafts' are gone."""
    for seq in engine.scheduler.running:
        if seq.num_tokens - seq.num_cached == 1:
            assert len(seq.block_ids) == engine.config.limits.blocks_for(seq.num_cached)


# -- the drafter ---------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_most_recent_match():
    d = NgramDrafter(max_n=3, min_n=1)
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]   # the later "1 2 3"
    assert d.propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]                      # up to the end
    assert d.propose([4, 1, 9, 9, 2, 1], 3) == [9, 9, 2]                   # falls back to n = 1
    assert d.propose([1, 2, 3, 4], 3) == []                                # no earlier match
    assert d.propose([1, 1, 1], 0) == [] and d.propose([1], 3) == []
    assert NgramDrafter(max_n=3, min_n=2).propose([4, 1, 9, 9, 2, 1], 3) == []
    with pytest.raises(ValueError):
        NgramDrafter(max_n=1, min_n=2)


def test_ngram_scores_a_draft_by_the_length_of_its_match():
    d = NgramDrafter(max_n=3, min_n=1)
    # "1 2 3" matched, and the token before both occurrences (5) agrees too: a 4-token match
    assert d.propose_scored([5, 1, 2, 3, 9, 8, 5, 1, 2, 3], 2) == ([9, 8], 4)
    assert d.propose_scored([4, 1, 9, 9, 2, 1], 3) == ([9, 9, 2], 1)     # "1" alone: 4 != 2
    assert d.propose_scored([1, 2, 3, 4], 3) == ([], 0)
    assert d.propose_scored([1, 1, 1], 0) == ([], 0)
    long = list(range(40)) * 2                                          # 37 tokens agree: capped
    assert d.propose_scored(long, 2) == ([0, 1], MAX_EVIDENCE)
    assert d.propose(long, 2) == [0, 1]


@pytest.mark.parametrize("max_n,min_n", [(4, 2), (3, 1)])
def test_the_incremental_index_finds_what_the_scan_finds(max_n, min_n):
    """A sequence's HistoryIndex, synced as its history grows a few tokens a step, gives the
    very draft and score of the scan over the whole history, with and without a corpus match,
    over small vocabularies (many matches, many ties) and a large one (few)."""
    rng = np.random.default_rng(max_n)
    for trial in range(150):
        d = NgramDrafter(max_n=max_n, min_n=min_n)
        vocab = [3, 5, 50][trial % 3]
        for _ in range(trial % 4):
            d.done(rng.integers(0, vocab, int(rng.integers(3, 40))).tolist())
        index, tokens = d.new_index(), rng.integers(0, vocab, int(rng.integers(1, 5))).tolist()
        for _ in range(40):
            k = int(rng.integers(0, 5))
            assert d.propose_scored(tokens, k, index=index) == d.propose_scored(tokens, k)
            tokens = tokens + rng.integers(0, vocab, int(rng.integers(1, 4))).tolist()
        assert index.tokens == tokens[:len(index.tokens)]
    # a history that does not extend the indexed one (here: shorter) is indexed anew
    d = NgramDrafter(max_n=3, min_n=1, cross_request=False)
    index = d.new_index()
    d.propose_scored([1, 2, 3, 1, 2], 2, index=index)
    assert d.propose_scored([7, 8, 7], 2, index=index) == ([8, 7], 1) == d.propose_scored([7, 8, 7], 2)


# -- acceptance on the real model ----------------------------------------------------------
@pytest.fixture(scope="module")
def prompts(smollm_tokenizer) -> list[list[int]]:
    return [smollm_tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_ngram_speculation_gives_the_same_tokens(smollm_fp32, prompts, params):
    expected = generate(make_engine(*smollm_fp32, num_kv_blocks=64), prompts, params)
    engine = make_engine(*smollm_fp32, num_kv_blocks=64, block_size=4)
    alone = []
    for i, p in enumerate(prompts):
        engine.spec_stats = SpecStats()
        engine.add_request(f"r{i}", p, params)
        alone.append(run_spec(engine, NgramDrafter(max_n=3, min_n=1))[f"r{i}"])
        if i == 0:                                  # the repetitive prompt: drafts get accepted
            assert engine.spec_stats.num_accepted_tokens > 0, engine.spec_stats
            assert engine.spec_stats.tokens_per_verify > 1.0
    assert alone == expected
    batched = make_engine(*smollm_fp32, num_kv_blocks=96, block_size=4)   # verify + plain rows
    for i, p in enumerate(prompts):
        batched.add_request(f"r{i}", p, params)
    tokens = run_spec(batched, NgramDrafter(max_n=3, min_n=1))
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
    for e in (engine, batched):
        assert_no_leaks(e)


def test_chunked_prefill_engine_verifies_within_its_budget(tiny_llama):
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], list(range(10, 50)), [7, 7, 7]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = generate(make_engine(*tiny_llama, num_kv_blocks=128, block_size=4), prompts, params)
    engine = make_engine(*tiny_llama, num_kv_blocks=128, block_size=4, chunked_prefill=True,
                         max_num_batched_tokens=8, max_num_seqs=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        drafts = propose_drafts(engine.scheduler.running, NgramDrafter(min_n=1), 4)
        for out in engine.step(drafts=drafts):
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        assert engine.last_batch.num_tokens <= 8
        assert_blocks_match_cache(engine)
    assert [tokens[f"r{i}"] for i in range(3)] == expected
    assert engine.spec_stats.num_verify_rows > 0
    assert_no_leaks(engine)


# -- KV roll-back and stop criteria --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reference(tiny_llama) -> tuple[list[int], list[int]]:
    prompt = [5, 9, 2, 7, 11]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    return prompt, generate(make_engine(*tiny_llama, num_kv_blocks=64, block_size=4), [prompt], params)[0]


def test_rejected_drafts_are_rolled_back(tiny_llama, tiny_reference):
    prompt, expected = tiny_reference
    wrong = next(t for t in range(128) if t not in expected)        # never the target's token
    engine = make_engine(*tiny_llama, num_kv_blocks=64, block_size=4)
    engine.add_request("r", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert run_spec(engine, OracleDrafter([], wrong=wrong), k=7)["r"] == expected
    assert engine.spec_stats.num_accepted_tokens == 0 < engine.spec_stats.num_draft_tokens
    assert engine.spec_stats.tokens_per_verify == 1.0
    assert_no_leaks(engine)


def test_a_draft_takes_only_free_blocks_and_never_preempts(tiny_llama, tiny_reference):
    prompt, expected = tiny_reference
    engine = make_engine(*tiny_llama, num_kv_blocks=3, block_size=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("a", prompt[:3], params)
    engine.add_request("b", prompt[:3], params)
    engine.step()                                   # both prompts: one block each, one free
    drafter = OracleDrafter([9] * 3 + [1] * 20)     # garbage is fine here: counting blocks
    engine.step(drafts=propose_drafts(engine.scheduler.running, drafter, 8))
    batch = engine.last_batch
    assert not batch.preempted
    assert [len(d) for d in batch.drafts.values()] == [4]       # "a" took the free block
    assert sorted(batch.num_new) == [1, 5]
    for req_id in ("a", "b"):
        engine.abort(req_id)
    assert_no_leaks(engine)


def test_abort_mid_speculation_frees_every_block(tiny_llama, tiny_reference):
    prompt, expected = tiny_reference
    engine = make_engine(*tiny_llama, num_kv_blocks=64, block_size=4)
    for i in range(3):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    drafter = OracleDrafter(prompt + expected)
    for _ in range(3):
        outs = engine.step(drafts=propose_drafts(engine.scheduler.running, drafter, 6))
    assert engine.last_batch.drafts and all(len(o.new_token_ids) == 7 for o in outs)
    for i in range(3):
        engine.abort(f"r{i}")
    assert_no_leaks(engine)


@pytest.mark.parametrize("limit", ["max_tokens", "stop_token", "context"])
def test_accepted_tokens_never_pass_a_stop(tiny_llama, tiny_reference, limit):
    prompt, expected = tiny_reference
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    kw = {}
    if limit == "max_tokens":
        params, want = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), expected[:6]
    elif limit == "stop_token":
        stop = expected[5]
        params = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop,))
        want = expected[:expected.index(stop) + 1]
    else:
        kw, want = {"max_model_len": len(prompt) + 9}, expected[:9]
    engine = make_engine(*tiny_llama, num_kv_blocks=64, block_size=4, **kw)
    engine.add_request("r", prompt, params)
    out = run_spec(engine, OracleDrafter(prompt + expected), k=8)["r"]
    assert out == want
    assert engine.spec_stats.num_accepted_tokens > 0
    assert_no_leaks(engine)


def test_drafts_out_of_vocabulary_are_refused(tiny_llama):
    engine = make_engine(*tiny_llama, num_kv_blocks=16, block_size=4)
    engine.add_request("r", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.step(drafts={"r": [1, 128]})


# -- the sampling rule, on a synthetic vocabulary ------------------------------------------
P = torch.tensor([[0.30, 0.05, 0.20, 0.10, 0.02, 0.15, 0.08, 0.10],
                  [0.05, 0.40, 0.05, 0.10, 0.10, 0.05, 0.20, 0.05],
                  [0.125] * 8])
Q = torch.tensor([[0.10, 0.30, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],
                  [0.20, 0.10, 0.30, 0.05, 0.05, 0.10, 0.10, 0.10]])
NUM_DRAWS = 20_000


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_target_probs_is_what_the_sampler_draws_from():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(temperature=0.7, top_k=10, top_p=0.8, seed=3),
                   SamplingParams(temperature=1.3, seed=4), SamplingParams(top_p=0.5, seed=5)):
        probs = target_probs(logits, params)
        assert torch.allclose(probs.sum(-1), torch.ones(4))
        for row in range(4):
            # same noise as _sample_row's (sampling.py): the race over target_probs picks its token
            gen = torch.Generator().manual_seed(_mix(params.seed, row))
            noise = torch.empty(50).exponential_(generator=gen)
            assert int((probs[row] / noise).argmax()) == _sample_row(logits[row], params, row)


@pytest.mark.parametrize("draft_kind", ["model", "one-hot"])
def test_sampling_acceptance_reproduces_the_target_distribution(draft_kind):
    logits = P.log()                                  # temperature 1: target_probs == P
    gen = torch.Generator().manual_seed(1)
    firsts, seconds, num_accepted = [], [], 0
    for i in range(NUM_DRAWS):
        params = SamplingParams(temperature=1.0, seed=i)
        if draft_kind == "model":
            draft = [int(torch.multinomial(Q[j], 1, generator=gen)) for j in range(2)]
            out = accept_with_probs(logits, draft, Q, params, step=0)
        else:                                          # a deterministic drafter: q one-hot
            draft = [0, 1]
            out = accept_draft(logits, draft, params, step=0)
        firsts.append(out[0])
        num_accepted += out[0] == draft[0]
        if len(out) > 1:
            seconds.append(out[1])
    assert chi_square(firsts, P[0]) < CHI2_CRITICAL_DF7
    assert chi_square(seconds, P[1]) < CHI2_CRITICAL_DF7
    if draft_kind == "one-hot":                       # accepted with probability p(x)
        assert abs(num_accepted / NUM_DRAWS - float(P[0, 0])) < 0.015
    else:
        assert abs(num_accepted / NUM_DRAWS - float(torch.minimum(P[0], Q[0]).sum())) < 0.015
    assert chi_square(torch.multinomial(Q[0], NUM_DRAWS, True, generator=gen).tolist(), P[0]) \
        > 10 * CHI2_CRITICAL_DF7                       # the test would catch the draft's own q


def test_sampling_acceptance_is_reproducible_per_seed():
    draft = [1, 2]
    params = SamplingParams(temperature=0.9, top_k=6, seed=11)
    runs = {tuple(accept_with_probs(P.log(), draft, Q, params, step=3)) for _ in range(3)}
    assert len(runs) == 1
    assert accept_draft(P.log(), [], params, 3) == [_sample_row(P.log()[0], params, 3)]


def test_a_finished_sequences_text_drafts_for_the_next_one():
    """The n-gram drafter's corpus: a history with no match of its own takes the longest match
    among finished sequences, scored like its own; a longer own match wins; the corpus is
    bounded, and what it dropped is never proposed."""
    d = NgramDrafter(max_n=3, min_n=2)
    first = [50, 51, 52, 53, 54, 55, 56]
    assert d.propose_scored([9, 8, 51, 52, 53], 2) == ([], 0)          # nothing finished yet
    d.done(first)
    assert d.propose_scored([9, 8, 51, 52, 53], 2) == ([54, 55], 3)    # corpus: "51 52 53"
    assert d.propose_scored([7, 50, 51, 52, 53], 2) == ([54, 55], 4)   # "50" before it agrees too
    own = [1, 2, 52, 53, 60, 61, 1, 2, 52, 53]                         # own match "1 2 52 53": 4
    assert d.propose_scored(own, 2) == ([60, 61], 4)
    assert NgramDrafter(cross_request=False).corpus is None

    corpus = TokenCorpus(max_n=3, min_n=2, max_tokens=10)
    corpus.add([1, 2, 3, 4, 5, 6])
    corpus.add([11, 12, 13, 14, 15, 16])                               # 12 tokens: the first goes
    assert list(corpus.docs.values())[0].tolist() == [11, 12, 13, 14, 15, 16]
    assert corpus.lookup(np.asarray([1, 2, 3]), 2) == ([], 0)
    assert corpus.lookup(np.asarray([0, 12, 13]), 2) == ([14, 15], 2)
    assert all(key in corpus.docs for key, _ in corpus.index.values())


# -- what a costly drafter's calls cost: k and the backlog (spec_policy.py) -----------------
MS = 1e-3
PROMPT = 1500                           # a summarization prompt's tokens


def step_s(rows: int) -> float:
    """A made-up decode step: 40 ms, and 2 ms a row more."""
    return 0.040 + 0.002 * (rows - 1)


class BacklogDrafter:
    """A draft model's costs on the test's clock: `per_k` seconds a token of k (its passes, for
    all the call's sequences at once) and `per_token` a token of a history it has not seen (what
    it computes first: a new sequence's prompt, an idle one's tokens since its last call). Each
    history's first token names its sequence. It proposes 7s (accepted as the test decides)."""

    def __init__(self, clock: list[float], per_k: float, per_token: float) -> None:
        self.clock, self.per_k, self.per_token = clock, per_k, per_token
        self.seen: dict[int, int] = {}
        self.calls: list[list[int]] = []        # each call's sequences (their first tokens)

    def propose_many(self, histories, k):
        unseen = sum(len(h) - self.seen.get(h[0], 0) for h in histories)
        self.clock[0] += k * self.per_k + unseen * self.per_token
        self.seen.update((h[0], len(h)) for h in histories)
        self.calls.append([h[0] for h in histories])
        return [[7] * k for _ in histories]

    def propose(self, token_ids, k):
        return self.propose_many([token_ids], k)[0]


def timed_policy(max_k: int = 3, **kw) -> AdaptiveK:
    policy = AdaptiveK(max_k, **kw)
    for n in list(range(1, 41)) * 2:                         # each n's first step: a warm-up
        policy.observe_step(n, step_s(n))
    return policy


def serve(policy: AdaptiveK, drafter: BacklogDrafter, steps: int, *, accept: bool, life: int,
          b: int = 8, first_prompt: int = PROMPT) -> tuple[float, dict[int, list[int]]]:
    """`steps` decode steps of b sequences, each left after `life` steps (the first b staggered,
    with `first_prompt` tokens) for a new one with a PROMPT-token prompt; every draft accepted
    (`accept`) or none. The steps' seconds (made up: step_s by rows, drafting apart) and the
    steps each sequence (by its first token) was asked at, from its first step."""
    spec = Speculator(drafter, policy, clock=lambda: drafter.clock[0])
    ids = itertools.count(1000)

    def new(prompt: int, steps_left: int) -> list:
        s = Sequence(f"s{(i := next(ids))}", [i] + [5] * (prompt - 1), GREEDY, output_ids=[4])
        s.num_cached = s.num_tokens - 1
        return [s, steps_left]

    live = [new(first_prompt, life * (j + 1) // b) for j in range(b)]
    born = dict.fromkeys((s.prompt_ids[0] for s, _ in live), 0)
    asked: dict[int, list[int]] = {first: [] for first in born}
    seconds = 0.0
    for step in range(steps):
        calls = len(drafter.calls)
        drafts = spec.drafts([s for s, _ in live])
        for first in (x for call in drafter.calls[calls:] for x in call):
            asked[first].append(step - born[first])
        seconds += step_s(b + sum(map(len, drafts.values())))
        for entry in live:
            s, d = entry[0], drafts.get(entry[0].req_id, [])
            if d:
                policy.record(s.req_id, len(d), len(d) if accept else 0)
            for _ in range(1 + (len(d) if accept else 0)):
                s.append_token(7)
            s.num_cached = s.num_tokens - 1
            entry[1] -= 1
            if entry[1] == 0:
                spec.forget(s.req_id)
                entry[:] = new(PROMPT, life)
                born[entry[0].prompt_ids[0]], asked[entry[0].prompt_ids[0]] = step + 1, []
    return seconds, asked


def test_drafting_costs_per_token_of_k_and_per_backlog_token_are_learnt_apart():
    """A drafter costing 1 ms a token of k and 0.5 ms a backlog token: the steps' calls (the
    batch's last accepted tokens) time k, the calls that bring a new sequence's prompt time the
    backlog, and a call is predicted from both (a new sequence's probe: its prefill)."""
    policy, clock = timed_policy(), [0.0]
    serve(policy, BacklogDrafter(clock, 1 * MS, 0.5 * MS), 300, accept=True, life=60)
    assert policy.draft_token_s == pytest.approx(1 * MS, rel=0.05)
    assert policy.backlog_token_s == pytest.approx(0.5 * MS, rel=0.05)
    assert policy._drafting_s(1, PROMPT) == pytest.approx(1 * MS + PROMPT * 0.5 * MS, rel=0.05)
    # backward compatible: a call told no backlog times k, as before
    old = AdaptiveK(3)
    old.observe_drafting(4, 8 * MS)
    assert old.draft_token_s == pytest.approx(2 * MS) and old.backlog_token_s is None


@pytest.mark.parametrize("per_k, per_token", [(1 * MS, 0.5 * MS), (1 * MS, 0.05 * MS), (60 * MS, 0.0)],
                         ids=["prefill-750ms", "prefill-75ms", "slow-passes"])
def test_a_drafter_that_never_pays_leaves_new_sequences_to_probes_within_budget(per_k, per_token):
    """Acceptance 0, a drafter timed on short prompts first, then sent new sequences with
    1,500-token prompts (a prefill each: 75-750 ms, against 54 ms steps), 8 at a time: no new
    sequence is asked every step, and probes wait until their own cost, backlog included, is
    paid for by the sequence's 1/8 of PROBE_SHARE, so drafting takes about PROBE_SHARE of the
    steps' time at most. (Before the backlog was priced, each new sequence's probe every
    probe_every steps cost a prefill: 44% of the steps' time at 750 ms; and each sequence had
    the whole PROBE_SHARE: 38% with 60 ms passes.)"""
    policy, clock = timed_policy(), [0.0]
    steps_s, asked = serve(policy, BacklogDrafter(clock, per_k, per_token), 3000, accept=False, life=300,
                           first_prompt=4)
    assert clock[0] <= (PROBE_SHARE + 0.01) * steps_s, clock[0] / steps_s
    long = {first: steps for first, steps in asked.items() if first >= 1008}    # the new sequences
    assert len(long) >= 70
    assert max(map(len, long.values())) <= 300 // policy.config.probe_every + 1
    if per_token * PROMPT > 0.5:           # a prefill no sequence's share pays for in its life
        assert not any(long.values())
    else:                                  # else probed now and then
        assert sum(map(bool, long.values())) >= len(long) // 2


def test_a_new_sequence_is_asked_only_while_the_drafter_pays_on_those_it_drafts_for():
    """A new sequence's acceptance is the instance's (high here), but its first call prefills
    its prompt: it is asked only while the sequence drafted for lately pays."""
    policy = timed_policy()
    policy.observe_drafting(3, 3 * MS)                                  # 1 ms a token of k
    policy.observe_drafting(3, 3 * MS + PROMPT * 0.5 * MS, backlog=PROMPT)   # 0.5 ms a backlog token
    assert (policy.draft_token_s, policy.backlog_token_s) == pytest.approx((1 * MS, 0.5 * MS))
    for _ in range(20):                                                 # others were accepted
        policy.want(["z"])
        policy.record("z", 3, 3)
    policy.forget("z")
    policy.want(["a"], num_tokens={"a": 100})
    policy.drafting(["a"])                                              # "a" drafted for ...
    for n in range(101, 106):                                           # ... and rejected
        policy.want(["a"], num_tokens={"a": n})
        policy.drafting(["a"])
        policy.record("a", 3, 0)
    assert "b" not in policy.want(["a", "b"], num_tokens={"a": 106, "b": PROMPT})
    assert policy.backlog("b") == PROMPT
    for n in range(106, 112):                                           # "a" turns repetitive
        policy.want(["a"], num_tokens={"a": n})
        policy.drafting(["a"])
        policy.record("a", 3, 3)
    assert policy.want(["a", "b"], num_tokens={"a": 112, "b": PROMPT}) == {"a": 3, "b": 3}


def test_a_cheap_drafter_that_pays_is_still_asked_for_every_sequence():
    """Every draft accepted, drafting cheap next to the step (a new sequence's prompt: 1.5 ms):
    once timed (one sequence first, twice: its prompt, then k), every sequence is asked at
    every step, a new one from its first."""
    policy, clock = timed_policy(), [0.0]
    drafter = BacklogDrafter(clock, 0.01 * MS, 0.001 * MS)
    serve(policy, drafter, 200, accept=True, life=40)
    assert list(map(len, drafter.calls[:2])) == [1, 1]
    assert all(len(call) == 8 for call in drafter.calls[2:]) and len(drafter.calls) == 200


def test_a_costly_backlog_waits_until_step_costs_are_measured():
    """Before any step is timed, costs are unitless priors: a sequence whose backlog a
    calibrated draft model would take more than UNWEIGHED_MAX_S to compute (a prompt's prefill)
    is not asked, not even probed; a short one is; once steps are timed, both are weighed."""
    from backends.core.spec_policy import UNWEIGHED_MAX_S
    policy = AdaptiveK(3, prior_accept=0.95)
    policy.observe_drafting(3, 0.4, backlog=256)          # calibration: 256 tokens in 0.4 s
    policy.observe_drafting(3, 0.03, backlog=1)
    assert policy.drafting_cost.predict(0, 1000) > UNWEIGHED_MAX_S > policy.drafting_cost.predict(0, 4)
    for _ in range(5):
        asked = policy.want(["long", "short"], num_tokens={"long": 1000, "short": 4})
        assert "long" not in asked
    assert "short" in asked
    for n in (1, 2, 3, 4, 5):
        for _ in range(2):
            policy.observe_step(n, 0.01 * n)
    policy.want(["long", "short"], num_tokens={"long": 1000, "short": 4})
    assert not policy._waits("long")
