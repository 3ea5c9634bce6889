"""The router's TPOT slack (a mean over the output): banked slack widens a mixed step, a deficit
shrinks the next one and delays local prefill, and the decode instance's step budget spends it.
The hand-made predictor and states are test_router.py's."""
from __future__ import annotations

import pytest

from backends.core.kv_cache import BlockManager
from backends.core.limits import EngineLimits
from backends.core.router import InstanceState, chunk_budget, step_budget
from backends.core.tpot_slack import (DEFICIT_SLOS, EXPECT_TTL_S, FUTURE_SHARE, IDLE_STEP_SLOS,
                                      MAX_SLACK_SLOS, SLACK_SHARE, Expected, plain_steps,
                                      scheduler_slack, sure_tokens, tpot_slack)
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Scheduler
from backends.core.sequence import Sequence
from planner.rate_search import SLO
from tests.test_router import TARGET, P, decode, go, prefill, seq

# ---- TPOT slack: a mean over the output -------------------------------------------------------

def _decoding(name, out_tokens, first_at, prompt=10):
    q = Sequence(name, [5] * prompt, SamplingParams(max_tokens=50, seed=0),
                 output_ids=list(range(1, out_tokens + 1)))
    q.num_cached, q.first_token_time = prompt + out_tokens - 1, first_at
    return q


def test_tpot_slack_is_the_least_banked_of_the_decoding_sequences():
    # a: 11 tokens in 0.5 s (10 gaps of SLO 0.1 s: 0.5 s banked); b: 3 tokens in 0.1 s (0.1 s)
    a, b = _decoding("a", 11, first_at=9.5), _decoding("b", 3, first_at=9.9)
    assert tpot_slack([a, b], 0.1, now=10.0) == pytest.approx(SLACK_SHARE * 0.1)
    # ... at most MAX_SLACK_SLOS SLOs (a request may join during the step unseen)
    assert tpot_slack([a], 0.1, now=10.0) == pytest.approx(min(SLACK_SHARE * 0.5, MAX_SLACK_SLOS * 0.1))
    late = _decoding("late", 3, first_at=9.76)                  # 0.24 s for 2 gaps: 0.04 s behind
    assert tpot_slack([a, late], 0.1, now=10.0) == pytest.approx(-0.04)    # steps 0.04 s shorter
    assert tpot_slack([a, late], 0.1, now=10.0, joining=1) == pytest.approx(-0.04)
    very_late = _decoding("very_late", 3, first_at=9.0)         # 1 s for 2 gaps: capped deficit
    assert tpot_slack([a, very_late], 0.1, now=10.0) == pytest.approx(-DEFICIT_SLOS * 0.1)
    fresh = _decoding("fresh", 1, first_at=None)                # no first-token time yet
    assert tpot_slack([a, fresh], 0.1, now=10.0) == 0.0
    prefilling = seq("p", 40)                                    # no TPOT yet: not counted
    assert tpot_slack([a, prefilling], 0.1, now=10.0) == tpot_slack([a], 0.1, now=10.0)
    assert tpot_slack([], 0.1, now=10.0) == 0.0
    assert tpot_slack([a], 0.1, now=10.0, joining=1) == 0.0     # one waiting to join banked nothing
    # the bound: a step of SLO + slack keeps every one within its SLO had it ended right after
    for q in (a, b):
        step = 0.1 + tpot_slack([a, b], 0.1, now=10.0)
        assert (10.0 + step - q.first_token_time) / q.num_output_tokens <= 0.1


def test_slack_widens_the_first_chunk_and_local_prefill_then_meets_ttft():
    # 4 running (34 ms steps) that banked 0.3 s: a 2,000-token prompt fits one step of up to
    # 0.4 s (0.234 s), where the per-step bound (0.1 s) cuts it into 4 (0.336 s)
    tight, banked = decode(), decode(step_slack_s=0.3)
    assert chunk_budget(banked, P, TARGET.tpot) > 2000 > chunk_budget(tight, P, TARGET.tpot)
    assert chunk_budget(banked, P, TARGET.tpot, slack=False) == chunk_budget(tight, P, TARGET.tpot)
    busy, slo = [prefill(queued=4000)], SLO(ttft=0.3, tpot=0.1)     # split: 0.62 s
    plain = go(2000, busy, [tight], slo=slo)
    assert not any(o.meets_slo for o in plain.options)
    assert next(o for o in plain.options if o.kind == "local").ttft_s == pytest.approx(0.336)
    d = go(2000, busy, [banked], slo=slo)
    assert d.kind == "local" and d.chosen.meets_slo
    assert d.chosen.ttft_s == pytest.approx(P.mixed_step_time(4, 2000, 2000)) == pytest.approx(0.234)
    assert d.chosen.tpot_s <= 0.1 and "slack 300 ms" in d.chosen.reason
    # a prompt longer than the slack's chunk: the rest goes in slack-free steps
    long = go(5000, busy, [banked], slo=SLO(ttft=10.0, tpot=0.1)).options[-1]
    head, rest = chunk_budget(banked, P, 0.1), chunk_budget(banked, P, 0.1, slack=False)
    full, tail = divmod(5000 - head, rest)
    assert long.ttft_s == pytest.approx(P.mixed_step_time(4, 2000, head) + full *
                                        P.mixed_step_time(4, 2000, rest) +
                                        (P.mixed_step_time(4, 2000, tail) if tail else 0))
    with pytest.raises(ValueError, match="step_slack_s"):
        decode(step_slack_s=float("nan"))


def test_a_deficit_shrinks_the_next_mixed_step_and_delays_local_prefill():
    tight, behind = decode(), decode(step_slack_s=-0.04)
    assert 0 < chunk_budget(behind, P, TARGET.tpot) < chunk_budget(tight, P, TARGET.tpot)
    assert P.mixed_step_time(4, 2000, chunk_budget(behind, P, TARGET.tpot)) <= TARGET.tpot - 0.04
    slo = SLO(ttft=10.0, tpot=0.1)
    prompt = 3 * chunk_budget(tight, P, 0.1)                 # several steps either way
    on_time = next(o for o in go(prompt, [], [tight], slo=slo).options if o.kind == "local")
    late = next(o for o in go(prompt, [], [behind], slo=slo).options if o.kind == "local")
    assert late.chunk_budget == on_time.chunk_budget         # only the first step repays it
    assert late.steps == on_time.steps + 1 and late.ttft_s > on_time.ttft_s
    # too far behind for one prompt token: plain decode steps until caught up, then the prompt
    plain = P.decode_step_time(4, 2000)
    far = decode(step_slack_s=-(0.1 - plain) * 1.5)
    assert chunk_budget(far, P, 0.1) == 0
    delayed = next(o for o in go(100, [], [far], slo=slo).options if o.kind == "local")
    assert "after 2 plain steps" in delayed.reason
    assert delayed.ttft_s == pytest.approx(2 * plain + P.mixed_step_time(4, 2000, 100))
    # a decode step alone over the SLO: no local prefill at all
    slow = decode(running=60, context=20000, max_num_seqs=64, step_slack_s=-0.01)
    assert next(o for o in go(100, [], [slow], slo=SLO(10.0, 0.05)).options
                if o.kind == "local").reason == "running batch at its TPOT limit"


def test_step_budget_spends_the_running_sequences_slack():
    lim = EngineLimits(num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=4096,
                       block_size=16, chunked_prefill=True)
    s = Scheduler(lim, BlockManager(lim.num_kv_blocks))
    a = seq("a", 10, 7)
    s.add_remote(a)
    s.admit_remote()
    s.kv_arrived(a)
    a.first_token_time = 0.0
    for t in range(20):                                         # 20 tokens in 0.2 s: 1.7 s banked
        s.update(s.schedule(now=0.01 * t), [7])
    s.add(seq("long", 3000))
    no_clock = step_budget(s, P, 0.1)
    spent = step_budget(s, P, 0.1, now=0.2)
    assert spent > no_clock
    slack = min(SLACK_SHARE * (0.1 * 20 - 0.2), MAX_SLACK_SLOS * 0.1)       # the cap binds
    assert P.mixed_step_time(1, a.num_tokens, spent - 1) <= 0.1 + slack
    st = InstanceState.from_scheduler("decode_0", "decode", s, tpot_slo=0.1, now=0.2)
    assert st.step_slack_s == pytest.approx(slack)
    s.add_remote(seq("joining", 9, 7))                          # now one waits to join
    assert step_budget(s, P, 0.1, now=0.2) == no_clock
    assert InstanceState.from_scheduler("decode_0", "decode", s).step_slack_s == 0.0


# ---- later tokens: a sequence sure to produce more is held to its SLO at its end -------------

def _sure(name, out_tokens, first_at, max_tokens=50, **kw):
    q = _decoding(name, out_tokens, first_at)
    q.params = SamplingParams(max_tokens=max_tokens, seed=0, ignore_eos=True, **kw)
    return q


def test_sure_tokens_are_those_nothing_can_stop():
    assert sure_tokens(_sure("a", 10, 0.0)) == 40                     # ignore_eos: to max_tokens
    assert sure_tokens(_decoding("b", 10, 0.0)) == 0                  # may stop at any EOS
    assert sure_tokens(_sure("c", 10, 0.0, stop_token_ids=(3,))) == 0
    assert sure_tokens(_sure("d", 10, 0.0, stop=("x",))) == 0
    q = _decoding("e", 10, 0.0)
    q.params = SamplingParams(max_tokens=50, seed=0, min_tokens=25)
    assert sure_tokens(q) == 15


def _final_tpot(q, first_step, plain, now):
    """q's TPOT at its end: one step of `first_step` now, the rest plain."""
    later = sure_tokens(q) - 1
    return (now + first_step + later * plain - q.first_token_time) / (q.num_output_tokens + later)


def test_a_sequence_with_later_tokens_lends_their_margin_to_one_long_step():
    slo, plain, now = 0.1, 0.03, 10.0
    q = _sure("q", 11, first_at=9.0)               # 10 gaps in 1 s: on its SLO, nothing banked
    assert tpot_slack([q], slo, now) == 0.0        # per step: no slack
    spare = 39 * (slo - plain)                     # this step and 38 later ones, 70 ms each
    slack = tpot_slack([q], slo, now, plain_step_s=plain)
    assert slack == pytest.approx(plain + FUTURE_SHARE * spare - slo) == pytest.approx(1.295)
    assert _final_tpot(q, slo + slack, plain, now) < slo       # half the spare left
    assert _final_tpot(q, plain + spare, plain, now) == pytest.approx(slo)   # all: on the edge
    # steps that each spend half of what is left never take it past its SLO
    t, s = now, _sure("s", 11, first_at=9.0)
    for _ in range(10):
        step = slo + tpot_slack([s], slo, t, plain_step_s=plain)
        t += step
        s.append_token(7)
        assert _final_tpot(s, plain, plain, t - plain) <= slo + 1e-9
    # one sure of fewer later tokens bounds the step: the least spare
    short = _sure("short", 11, first_at=9.0, max_tokens=13)
    assert tpot_slack([q, short], slo, now, plain_step_s=plain) < slack
    # a spare spent (it ran long steps): plain steps only, however far behind
    spent = _sure("spent", 11, first_at=5.0)
    assert tpot_slack([spent], slo, now, plain_step_s=plain) == pytest.approx(plain - slo)
    # a plain step over the SLO: nothing to lend
    assert tpot_slack([q], slo, now, plain_step_s=0.12) == pytest.approx(0.02)
    # one that may stop at any token keeps the per-step rule beside it
    maybe = _decoding("maybe", 3, first_at=9.9)    # 0.1 s banked
    assert tpot_slack([q, maybe], slo, now, plain_step_s=plain) == pytest.approx(SLACK_SHARE * 0.1)


def test_sequences_waiting_to_join_count_with_their_own_spare():
    slo, plain, now = 0.1, 0.03, 10.0
    q = _sure("q", 11, first_at=9.0)
    alone = tpot_slack([q], slo, now, plain_step_s=plain)
    joiner = _sure("j", 1, first_at=9.5, max_tokens=20)        # waited 0.5 s for its KV
    both = tpot_slack([q], slo, now, plain_step_s=plain, joiners=[joiner])
    assert both == pytest.approx(plain + FUTURE_SHARE * (-0.5 + 19 * (slo - plain)) - slo)
    assert both < alone
    unsure = _decoding("u", 1, first_at=9.9)                  # may stop at once: banked nothing
    assert tpot_slack([q], slo, now, plain_step_s=plain, joiners=[unsure]) == 0.0


def test_the_step_budget_and_published_state_count_later_tokens():
    lim = EngineLimits(num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=4096,
                       block_size=16, chunked_prefill=True)
    budgets = []
    for params in (SamplingParams(max_tokens=100, seed=0),
                   SamplingParams(max_tokens=100, seed=0, ignore_eos=True)):
        s = Scheduler(lim, BlockManager(lim.num_kv_blocks))
        a = Sequence("a", [5] * 10, params)
        s.add_remote(a)
        s.admit_remote()
        s.kv_arrived(a)
        a.append_token(7)
        a.first_token_time = 0.0
        for t in range(20):                                     # on its SLO: nothing banked
            s.update(s.schedule(now=0.1 * t), [7])
        s.add(seq("long", 3000))
        budgets.append(step_budget(s, P, 0.1, now=2.0))
        st = InstanceState.from_scheduler("decode_0", "decode", s, tpot_slo=0.1, now=2.0,
                                          plain=plain_steps(s, P))
        assert P.mixed_step_time(1, a.num_tokens, budgets[-1] - 1) <= 0.1 + st.step_slack_s + 1e-9
    assert budgets[1] > budgets[0]                 # 79 later tokens lend their margin


# ---- an idle decode instance, and the joiners it expects --------------------------------------

def test_an_idle_instance_bounds_a_step_only_by_its_token_budget():
    slo, plain = 0.1, 0.03
    assert tpot_slack([], slo, 10.0, plain_step_s=plain) == IDLE_STEP_SLOS * slo
    assert tpot_slack([], slo, 10.0) == 0.0                  # the per-step rule is unchanged
    prefilling = seq("p", 900)                               # a local prompt has no TPOT yet
    assert tpot_slack([prefilling], slo, 10.0, plain_step_s=plain) == IDLE_STEP_SLOS * slo
    # a sequence waiting for its KV, or one expected, is not idle
    joiner = _sure("j", 1, first_at=9.5, max_tokens=20)
    assert tpot_slack([], slo, 10.0, plain_step_s=plain, joiners=[joiner]) < 1.0
    lim = EngineLimits(num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=2048,
                       block_size=16, chunked_prefill=True)
    s = Scheduler(lim, BlockManager(lim.num_kv_blocks))
    s.add(seq("long", 1500))
    assert step_budget(s, P, 0.1, now=1.0) >= 1500           # the whole prompt in one step
    s.expect(Expected("x", 3, since=1.0))                    # 3 tokens after its first
    spare = 0.1 + 2 * (0.1 - P.decode_step_time(1, 1))       # this step's margin, 2 later ones
    budget = step_budget(s, P, 0.1, now=1.0)
    assert budget < 1500                                     # the prompt over two steps
    assert P.mixed_step_time(0, 0, budget) <= FUTURE_SHARE * spare + 1e-9 < P.mixed_step_time(0, 0, budget + 1)


def test_expected_joiners_count_with_their_spare_until_they_arrive_or_expire():
    slo, plain, now = 0.1, 0.03, 10.0
    lim = EngineLimits(num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=4096,
                       block_size=16, chunked_prefill=True)
    s = Scheduler(lim, BlockManager(lim.num_kv_blocks))
    params = SamplingParams(max_tokens=20, seed=0, ignore_eos=True)
    e = Expected.of("j", params, since=now)
    assert e.sure == 19                                      # its first token comes from prefill
    assert Expected.of("k", SamplingParams(max_tokens=20, seed=0), now).sure == 0   # may stop
    s.expect(e)
    joiner = _sure("j", 1, first_at=now, max_tokens=20)     # the same request, arrived
    expected = scheduler_slack(s, slo, now, (plain, plain))
    assert expected == pytest.approx(tpot_slack([], slo, now, plain_step_s=plain,
                                                later_step_s=plain, joiners=[joiner]))
    assert expected == pytest.approx(plain + FUTURE_SHARE * 19 * (slo - plain) - slo)
    # one that cannot promise a token after its first holds the batch like a joiner
    s.expect(Expected.of("k", SamplingParams(max_tokens=20, seed=0), now))
    assert scheduler_slack(s, slo, now, (plain, plain)) == pytest.approx(min(0.0, expected))
    assert scheduler_slack(s, slo, now) == 0.0                                # per step too
    # arrival (its KV now on the way) replaces the expectation; expiry drops the rest
    arrived = Sequence("k", [5] * 10, SamplingParams(max_tokens=20, seed=0), output_ids=[7])
    s.add_remote(arrived)
    assert [x.req_id for x in s.expecting(now)] == ["j"]
    assert s.expecting(now + EXPECT_TTL_S + 1) == [] and s.expected == {}
    assert scheduler_slack(s, slo, now, (plain, plain)) == 0.0   # k is a joiner now: holds it
