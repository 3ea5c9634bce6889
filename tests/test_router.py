"""The router on hand-made instance states with a hand-made linear predictor (no model, no
Triton), its chunk budget, the state an instance publishes from its scheduler, and the
planner's predictor against the simulator's step pricing (TPOT slack: test_router_slack.py).

The predictor `Linear`: prefill 10 ms + 0.1 ms per prompt token; a decode step 10 ms + 1 ms per
sequence + 0.01 ms per context token; a mixed step the chunk's prefill plus the decodes'
marginal cost. SLOs: TTFT 0.5 s, TPOT 0.1 s."""
from __future__ import annotations

import json

import pytest

from backends.core.kv_cache import BlockManager
from backends.core.limits import EngineLimits
from backends.core.router import (FEW_LOCAL_STEPS, Decision, InstanceState, chunk_budget,
                                  prefill_slowdown, route)
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch, Scheduler
from backends.core.sequence import Sequence
from planner.latency import LatencyModel
from planner.rate_search import SLO
from planner.router_latency import LatencyModelPredictor

TARGET = SLO(ttft=0.5, tpot=0.1)


class Linear:
    def prefill_time(self, lens, prefix=0):            # no attention term: prefix is free
        return 0.010 + 1e-4 * sum(lens) if lens else 0.0

    def decode_step_time(self, n, ctx):
        return 0.010 + 1e-3 * n + 1e-5 * ctx if n else 0.0

    def mixed_step_time(self, n, ctx, chunk, prefix=0):
        if not chunk:
            return self.decode_step_time(n, ctx)
        return self.prefill_time([chunk]) + 1e-3 * n + 1e-5 * ctx


P = Linear()


def prefill(name="prefill_0", queued=0, requests=None, free=1000, **kw) -> InstanceState:
    requests = int(queued > 0) if requests is None else requests
    return InstanceState(name, "prefill", free, queued, requests, **kw)


def decode(name="decode_0", running=4, context=2000, free=1000, local=True, **kw) -> InstanceState:
    return InstanceState(name, "decode", free, num_running=running, running_context=context,
                         local_prefill=local, **kw)


def go(prompt_len, prefills, decodes, max_tokens=100, slo=TARGET) -> Decision:
    return route(prompt_len, max_tokens, slo, prefills, decodes, P)


# ---- the choice -----------------------------------------------------------------------------

def test_short_prompt_beside_a_light_decode_batch_goes_local():
    # the prefill instance is busy with one long prompt (0.11 s): local prefill (one 44 ms mixed
    # step) gives the lower TTFT and keeps the decode batch within its TPOT
    d = go(100, [prefill(queued=1000)], [decode()])
    assert (d.kind, d.chosen.decode, d.chosen.prefill) == ("local", "decode_0", None)
    assert d.chosen.ttft_s == pytest.approx(0.044)
    assert d.chosen.chunk_budget > 100 and d.chosen.meets_slo


def test_long_prompt_goes_to_prefill():
    # the same instances: 3000 tokens locally are 5 mixed steps (0.47 s), on prefill 0.42 s
    d = go(3000, [prefill(queued=1000)], [decode()])
    assert (d.kind, d.chosen.prefill, d.chosen.decode) == ("split", "prefill_0", "decode_0")
    local = next(o for o in d.options if o.kind == "local")
    assert local.ttft_s > d.chosen.ttft_s


def test_a_local_prefill_over_several_steps_only_where_no_split_meets_both():
    # 1,500 tokens beside 4 running: 3 mixed steps of <= 660 tokens (0.252 s), against split
    # behind 1,000 queued tokens (0.27 s). With TTFT 0.5 s both meet it: split, though local is
    # sooner (each local step spends the batch's slack on a prediction, and requests still
    # prefilling elsewhere join behind them unseen); with TTFT 0.26 s only local meets it: local
    d = go(1500, [prefill(queued=1000)], [decode()])
    split, local = d.options
    assert local.steps == 3 and local.meets_slo and split.meets_slo and local.ttft_s < split.ttft_s
    assert d.kind == "split" and d.reason == "meets both SLOs, lowest TTFT"
    d = go(1500, [prefill(queued=1000)], [decode()], slo=SLO(ttft=0.26, tpot=0.1))
    assert d.kind == "local" and d.chosen.steps == 3
    assert d.reason == "meets both SLOs only by a local prefill over several steps"
    # one step: cheap, and it competes on TTFT as before
    assert go(100, [prefill(queued=1000)], [decode()]).chosen.steps == 1


def test_a_local_prefill_over_a_few_steps_is_taken_where_it_is_clearly_sooner():
    # behind 2,000 queued tokens split takes 0.37 s; the same 3 local steps (0.252 s) are
    # sooner by more than LOCAL_MARGIN (10%) of the 0.5 s TTFT SLO
    d = go(1500, [prefill(queued=2000)], [decode()])
    split, local = d.options
    assert split.meets_slo and split.ttft_s == pytest.approx(0.37)
    assert d.kind == "local" and d.chosen.steps == 3
    assert d.reason == "meets both SLOs, a local prefill over a few steps clearly sooner"
    # sooner by far, but over more than FEW_LOCAL_STEPS steps (a TPOT SLO that leaves 180
    # tokens a step: 9 steps, 0.47 s) against split behind 5,000 tokens (0.67 s): split
    d = go(1500, [prefill(queued=5000)], [decode()], slo=SLO(1.0, 0.052))
    split, local = d.options
    assert local.meets_slo and local.steps == 9 > FEW_LOCAL_STEPS and split.meets_slo
    assert local.ttft_s < split.ttft_s - 0.1 and d.kind == "split"


def test_a_measured_bias_is_added_to_the_predictions_of_its_instance():
    plain = go(1500, [prefill(queued=1000)], [decode()])
    late = go(1500, [prefill(queued=1000, ttft_bias_s=0.2)], [decode(ttft_bias_s=-0.01)])
    for before, after, bias in zip(plain.options, late.options, (0.2, -0.01)):
        assert after.ttft_s == pytest.approx(before.ttft_s + bias) and after.ttft_bias_s == bias
        assert "measured bias" in after.reason
    assert plain.kind == "split" and late.kind == "local"      # split now 0.47 s, local 0.242 s
    assert not late.options[0].meets_slo or late.options[0].ttft_s > 0.45
    # a bias below minus the prediction gives 0, never a negative time
    early = go(100, [prefill(ttft_bias_s=-5.0)], [decode(ttft_bias_s=-5.0)])
    assert all(o.ttft_s == 0.0 and o.ttft_bias_s > -1.0 for o in early.options)


def test_decode_batch_at_its_tpot_limit_sends_a_short_prompt_to_prefill():
    # a 99.95 ms decode step: one more prompt token breaks 100 ms; on the only decode instance
    # the prompt goes to prefill, the least bad (its decode step after joining is over too)
    full = decode(running=50, context=3995, max_num_seqs=64)
    assert chunk_budget(full, P, TARGET.tpot) == 0
    d = go(100, [prefill(queued=1000)], [full])
    assert d.kind == "split" and "misses TPOT" in d.chosen.reason
    assert "TPOT limit" in next(o for o in d.options if o.kind == "local").reason
    # beside a decode instance with room (but no mixed steps) it meets both there
    d = go(100, [prefill(queued=1000)], [full, decode("decode_1", local=False)])
    assert (d.kind, d.chosen.decode) == ("split", "decode_1") and d.chosen.meets_slo


def test_no_instance_with_free_kv_means_wait():
    # 100 + 200 tokens need 19 blocks of 16; 18 free on decode is not enough to prefill there,
    # and a prefill instance without room for the prompt cannot take it either
    d = go(100, [prefill(free=6)], [decode(free=18)], max_tokens=200)
    assert d.kind == "wait" and d.chosen is None
    assert "KV" in d.reason
    assert all(o.ttft_s is None and "KV" in o.reason for o in d.options)
    assert go(100, [prefill(free=6)], [decode(free=19)], max_tokens=200).kind == "local"
    assert go(100, [prefill(free=7)], [decode(free=18)], max_tokens=200).kind == "split"


def test_a_full_decode_instance_delays_admission_not_the_prefill():
    """Split needs no decode KV now: decode pulls the prefilled KV from prefill's pool once it
    has room, so the request is prefilled at once and nothing is overcommitted."""
    d = go(100, [prefill()], [decode(free=0, local=False)])
    assert d.kind == "split" and d.chosen.decode == "decode_0" and d.chosen.ttft_s is not None
    # with a decode instance that has room, that one
    d = go(100, [prefill()], [decode("decode_0", running=0, context=0, free=0),
                              decode("decode_1", running=8, context=4000)])
    assert d.chosen.decode == "decode_1"


def test_kv_is_never_overcommitted_even_for_a_lighter_instance():
    # decode_0 is idle but full; the request decodes on decode_1 or prefills locally there
    tight = decode("decode_0", running=0, context=0, free=5)
    roomy = decode("decode_1", running=8, context=4000)
    for prompt_len in (100, 3000):
        d = go(prompt_len, [prefill()], [tight, roomy])
        assert d.chosen.decode == "decode_1", prompt_len


def test_prefill_instance_without_kv_for_the_prompt_is_not_chosen():
    d = go(1000, [prefill("prefill_0", free=10), prefill("prefill_1", queued=2000, free=100)],
           [decode(local=False)])
    assert d.chosen.prefill == "prefill_1"


def test_the_less_loaded_prefill_instance_is_chosen():
    d = go(3000, [prefill("prefill_0", queued=2000), prefill("prefill_1", queued=500)], [decode(local=False)])
    assert (d.kind, d.chosen.prefill) == ("split", "prefill_1")
    d = go(3000, [prefill("prefill_0", queued=500), prefill("prefill_1", queued=2000)], [decode(local=False)])
    assert d.chosen.prefill == "prefill_0"


def test_the_decode_instance_with_the_lowest_tpot_is_chosen_for_split():
    busy, light = decode("decode_0", running=20, context=20000), decode("decode_1", running=2, context=500)
    d = go(3000, [prefill()], [busy, light])
    assert (d.kind, d.chosen.decode) == ("split", "decode_1")


def test_least_bad_option_when_none_meets_both():
    # TTFT 50 ms: no path prefills 3000 tokens in time; split is the least over
    d = go(3000, [prefill()], [decode()], slo=SLO(ttft=0.05, tpot=0.1))
    assert d.kind == "split" and not d.chosen.meets_slo
    assert "no option meets both" in d.reason and "misses TTFT" in d.chosen.reason


def test_measured_step_time_shifts_the_predictions():
    light = decode()                                        # predicted step 34 ms
    slow = decode(recent_step_s=0.080)                      # measured 80 ms
    assert chunk_budget(slow, P, TARGET.tpot) < chunk_budget(light, P, TARGET.tpot)
    assert go(100, [prefill(queued=1000)], [light]).kind == "local"
    d = go(100, [prefill(queued=1000)], [slow])
    assert d.kind == "local" and d.chosen.ttft_s == pytest.approx(0.044 + 0.046)


def test_a_prefill_instance_measured_slower_than_the_model_is_priced_so():
    # the model prefills at 1e-4 s a token (10,000 a second); measured at half that, split's
    # TTFT doubles; 3,000 tokens: 0.31 s by the model (split, within 0.5 s), 0.62 s measured,
    # so the local prefill over several steps (0.47 s) is the one that meets both SLOs
    assert go(3000, [prefill()], [decode()]).kind == "split"
    d = go(3000, [prefill(prefill_rate=5000.0)], [decode()])
    split = next(o for o in d.options if o.kind == "split")
    assert split.ttft_s == pytest.approx(0.62) and not split.meets_slo
    assert "2.00x the model's time (measured)" in split.reason
    assert d.kind == "local" and d.chosen.meets_slo
    # measured faster: priced faster, within the trusted range (0.25-8x)
    assert prefill_slowdown(prefill(prefill_rate=20000.0), P) == pytest.approx(0.5)
    assert prefill_slowdown(prefill(prefill_rate=1.0), P) == 8.0
    assert prefill_slowdown(prefill(), P) == 1.0                  # nothing measured yet
    with pytest.raises(ValueError, match="prefill_rate"):
        prefill(prefill_rate=0.0)


def test_speculation_yield_divides_tpot_and_widens_the_chunk_budget():
    # a verify step measured at 150 ms that gives each sequence 2 tokens: 75 ms per token,
    # within the 100 ms TPOT; the same step without speculation's yield misses it
    plain = decode(recent_step_s=0.150)
    spec = decode(recent_step_s=0.150, tokens_per_step=2.0)
    assert chunk_budget(plain, P, TARGET.tpot) == 0 < chunk_budget(spec, P, TARGET.tpot)
    d = go(100, [prefill()], [spec], slo=SLO(ttft=0.5, tpot=0.1))
    split = next(o for o in d.options if o.kind == "split")
    assert split.tpot_s == pytest.approx((P.decode_step_time(5, 2100) + 0.150
                                          - P.decode_step_time(4, 2000)) / 2)
    assert split.meets_slo
    assert not next(o for o in go(100, [prefill()], [plain]).options if o.kind == "split").meets_slo
    with pytest.raises(ValueError, match="tokens_per_step"):
        decode(tokens_per_step=0.5)


# ---- the chunk budget -----------------------------------------------------------------------

@pytest.mark.parametrize("running,context", [(0, 0), (1, 100), (4, 2000), (30, 3000), (50, 2999)])
def test_chunk_budget_is_the_most_that_keeps_the_step_within_tpot(running, context):
    s = decode(running=running, context=context, max_num_seqs=64)
    b = chunk_budget(s, P, TARGET.tpot)
    assert b > 0
    assert P.mixed_step_time(running, context, b) <= TARGET.tpot
    assert P.mixed_step_time(running, context, b + 1) > TARGET.tpot


def test_chunk_budget_is_zero_at_the_limit_and_capped_by_the_step_token_budget():
    assert chunk_budget(decode(running=50, context=3995, max_num_seqs=64), P, TARGET.tpot) == 0
    assert chunk_budget(decode(running=90, context=0, max_num_seqs=128), P, TARGET.tpot) == 0
    assert chunk_budget(decode(running=4, max_num_batched_tokens=64), P, TARGET.tpot) == 60
    assert chunk_budget(decode(running=4), P, tpot_slo=10.0) == 2048 - 4


# ---- what the decision carries --------------------------------------------------------------

def test_every_option_is_listed_with_predictions_and_a_reason():
    states_p = [prefill("prefill_0", queued=1000), prefill("prefill_1")]
    states_d = [decode("decode_0"), decode("decode_1", local=False), decode("decode_2", free=0)]
    d = go(500, states_p, states_d)
    kinds = [(o.kind, o.prefill or o.decode) for o in d.options]
    assert kinds == [("split", "prefill_0"), ("split", "prefill_1"),
                     ("local", "decode_0"), ("local", "decode_1"), ("local", "decode_2")]
    assert all(o.reason for o in d.options) and d.reason
    for o in d.options[:3]:
        assert o.ttft_s > 0 and o.tpot_s > 0
    assert "1 mixed step of" in d.options[2].reason
    assert "no mixed steps" in d.options[3].reason and "KV" in d.options[4].reason
    out = json.loads(json.dumps(d.to_dict()))
    assert out["kind"] == d.kind and out["decode"] == d.chosen.decode and len(out["options"]) == 5
    assert out["options"][0]["ttft_s"] == d.options[0].ttft_s
    assert json.loads(json.dumps(go(100, [prefill(free=0)], [decode(free=0)]).to_dict()))["kind"] == "wait"


def test_ties_are_deterministic():
    # identical prefill instances: the first; the same states twice: the same decision
    twins = [prefill("prefill_0", queued=300), prefill("prefill_1", queued=300)]
    d = go(3000, twins, [decode(local=False)])
    assert d.chosen.prefill == "prefill_0"
    assert go(3000, twins, [decode(local=False)]) == d
    # split and local with exactly the same TTFT (idle instances, one chunk): split
    d = go(100, [prefill()], [decode(running=0, context=0)])
    split, local = d.options
    assert split.ttft_s == local.ttft_s and split.kind == "split" and d.chosen is split


def test_a_full_batch_takes_no_local_prefill_and_nowhere_to_go_means_wait():
    full = decode(running=8, context=800, max_num_seqs=8)
    d = go(100, [prefill()], [full])
    assert d.kind == "split" and "batch full" in d.options[1].reason     # decode queues it for a slot
    d = go(100, [], [full])
    assert d.kind == "wait" and d.reason == "no instance has KV free for it"


def test_states_are_checked():
    with pytest.raises(ValueError):
        go(100, [decode()], [decode()])
    with pytest.raises(ValueError):
        InstanceState("x", "colocated", 10)
    with pytest.raises(ValueError):
        InstanceState("x", "decode", -1)
    with pytest.raises(ValueError):
        go(0, [prefill()], [decode()])


# ---- the state an instance publishes --------------------------------------------------------

def seq(req_id, prompt_len, first_token=None):
    return Sequence(req_id, [5] * prompt_len, SamplingParams(max_tokens=50, seed=0),
                    output_ids=[] if first_token is None else [first_token])


def test_state_from_a_chunked_decode_scheduler():
    lim = EngineLimits(num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                       chunked_prefill=True)
    s = Scheduler(lim, BlockManager(lim.num_kv_blocks))
    a, b = seq("a", 10, 7), seq("b", 6, 7)
    s.add_remote(a)
    s.add_remote(b)
    assert s.admit_remote() == [a, b]
    s.kv_arrived(a)                                         # a runs, b's KV still loading
    c = seq("c", 40)
    s.add(c)
    s.update(s.schedule(), [7])                             # a decodes, c's first chunk (31)
    s.add(seq("d", 5))
    s.add_remote(seq("e", 9, 7))                            # queued for KV: 3 blocks promised
    st = InstanceState.from_scheduler("decode_0", "decode", s, recent_step_s=0.02)
    assert (st.queued_tokens, st.queued_requests) == (40 - 31 + 5, 2)
    assert (st.num_running, st.running_context) == (3, 12 + 7 + 10)
    # promised: e's 3 prompt blocks, c's last 9 tokens (blocks 8..10 of 10: 2 more), d's 2
    assert st.free_kv_blocks == lim.num_kv_blocks - s.blocks.num_used - 3 - 2 - 2
    assert st.local_prefill and st.recent_step_s == 0.02 and st.max_num_batched_tokens == 32
    assert not InstanceState.from_scheduler("prefill_0", "prefill", s).local_prefill


# ---- the planner's predictor ----------------------------------------------------------------

def test_planner_predictor_prices_steps_as_the_simulator():
    from planner.simulator import InstanceSpec, Stage as _Stage, _Engine
    model = LatencyModel("m", "cpu", 1, prefill=(0.02, 1e-4, 1e-8), decode_small=(0.015, 2e-6, 5e-4),
                         decode_large=(0.015, 2e-6, 5e-4))
    pred = LatencyModelPredictor(model)
    lim = EngineLimits(num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
                       chunked_prefill=True)
    engine = _Engine("decode", 0, InstanceSpec(model, lim), _Stage(1), BlockManager(64))
    decodes = [seq("a", 10, 7), seq("b", 20, 7)]
    batch = Batch(seqs=[*decodes, seq("c", 40)], num_new=[1, 1, 24], num_decodes=2)
    assert pred.mixed_step_time(2, 11 + 21, 24) == pytest.approx(engine.step_time(batch))
    batch = Batch(seqs=decodes, num_new=[1, 1], num_decodes=2)
    assert pred.decode_step_time(2, 32) == pytest.approx(engine.step_time(batch))
    assert pred.prefill_time([24, 40]) == pytest.approx(model.prefill_time([24, 40]))
    assert pred.mixed_step_time(0, 0, 24) == pytest.approx(model.prefill_time([24]))
    assert LatencyModelPredictor(model.with_pp(2)).prefill_time([24]) == pytest.approx(
        2 * model.with_pp(2).prefill_time([24]))


def test_a_chunk_after_cached_tokens_is_priced_with_its_attention_over_them():
    """The quadratic term prices a chunk's attention over what precedes it (a cached prefix,
    or the prompt's own earlier chunks), in the router and the simulator alike, and the
    decode instance's step budget takes it: a later turn's chunk after its cached history is
    smaller, and its local TTFT higher, than a cold chunk's."""
    from backends.core.prefix_cache import PrefixCache
    from planner.simulator import InstanceSpec, Stage as _Stage, _Engine
    model = LatencyModel("m", "cpu", 1, prefill=(0.005, 1.3e-3, 5e-7),    # the AMD host's form
                         decode_small=(0.008, 6e-6, 0.0), decode_large=(0.008, 6e-6, 0.0))
    pred = LatencyModelPredictor(model)
    assert pred.mixed_step_time(0, 0, 130, 800) == pytest.approx(
        model.prefill_time([930]) - model.prefill_time([800]) + model.prefill[0])
    assert pred.mixed_step_time(0, 0, 130, 800) > 1.4 * pred.mixed_step_time(0, 0, 130)
    lim = EngineLimits(num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=2048,
                       block_size=16, chunked_prefill=True)
    engine = _Engine("decode", 0, InstanceSpec(model, lim), _Stage(1), BlockManager(512))
    later = seq("c", 1000)
    later.num_cached = 800
    batch = Batch(seqs=[seq("a", 10, 7), later], num_new=[1, 130], num_decodes=1)
    assert pred.mixed_step_time(1, 11, 130, 800) == pytest.approx(engine.step_time(batch))
    d = decode(running=2, context=600)
    assert chunk_budget(d, pred, 0.1, prefix=1500) < chunk_budget(d, pred, 0.1)
    # routed: the cached history is not free to attend over
    slo = SLO(ttft=10.0, tpot=0.1)
    local = next(o for o in route(1600, 50, slo, [], [d], pred, hits={"decode_0": 1500}).options
                 if o.kind == "local")
    assert local.ttft_s > pred.mixed_step_time(2, 600, 100)
    # the decode instance's next chunk: after a part-way prompt's cached tokens, or after the
    # first waiting prompt's cached prefix
    s = Scheduler(lim, BlockManager(512, PrefixCache(16)))
    assert s.next_chunk_prefix() == 0
    first = Sequence("t1", list(range(1, 801)), SamplingParams(max_tokens=4, seed=0))
    s.add(first)
    s.update(s.schedule(token_budget=500), [0])
    assert s.next_chunk_prefix() == 500                        # part-way
    s.update(s.schedule(token_budget=500), [7])              # prefilled: its blocks cached
    s.finish(first)
    s.add(Sequence("t2", list(range(1, 801)) + [900] * 200, SamplingParams(max_tokens=4, seed=0)))
    assert s.next_chunk_prefix() == 800                         # waiting, its history cached
