"""Planner: latency model and fit, simulator (M/D/1, determinism, invariants), goodput search."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from backends.core.limits import EngineLimits
from planner.latency import (LatencyModel, LatencyTable, Link, anchor_path, fit_model,
                             load_kv_capacity, load_profile)
from planner.placement import plan_fixed, plan_high, plan_low
from planner.search import SLO, Cluster, Planner, SearchSpace, decode_fluid_rate, goodput
from planner.simulator import (InstanceSpec, SimConfig, SimResult, Simulator, make_requests,
                               poisson_arrivals, simulate)

A100 = anchor_path("distserve-a100-profile.distserve.json")
needs_anchors = pytest.mark.skipif(not A100.is_file(), reason="../shared/anchors not present")


def make_latency(prefill=(0.01, 1e-4, 1e-8), small=(0.005, 1e-6, 1e-4), large=(0.004, 1e-6, 2e-4)):
    return LatencyModel("toy", "cpu", 1, prefill, small, large, decode_threshold=8)


def make_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(p), int(o)) for p, o in zip(rng.integers(4, 300, n), rng.integers(1, 60, n))]


# ---- latency --------------------------------------------------------------------------------

def test_fit_recovers_coefficients_from_noisy_samples():
    truth = make_latency()
    rng = np.random.default_rng(0)
    pre = []
    for _ in range(300):
        lens = rng.integers(1, 1024, rng.integers(1, 8)).tolist()
        pre.append((lens, truth.prefill_time(lens) * (1 + rng.normal(0, 0.01))))
    dec = []
    for _ in range(400):
        bs = int(rng.integers(1, 32))
        ctx = int(rng.integers(bs, bs * 2048))
        dec.append((bs, ctx, truth.decode_time(bs, ctx) * (1 + rng.normal(0, 0.01))))
    fit = fit_model(pre, dec, model="toy", device="cpu", threshold=8)
    for name in ("prefill", "decode_small", "decode_large"):
        np.testing.assert_allclose(getattr(fit, name), getattr(truth, name), rtol=0.1)


def test_saturation_length_is_where_prefill_reaches_its_share_of_the_best_rate():
    linear = LatencyModel("toy", "cpu", 1, (0.01, 1e-4, 0.0), (0.005, 1e-6, 1e-4), (0.004, 1e-6, 2e-4))
    rate = lambda lat, n: n / lat.prefill_time([n])                     # noqa: E731
    # a + b L: the rate grows to the limit; 95% of rate(2048) first at L = 961.6 -> 976
    assert linear.saturation_length() == 976
    assert linear.saturation_length(share=0.5) == 96        # 0.01 x 4767 / (1 - 0.4767) = 91.1
    quadratic = make_latency()                                # c > 0: the rate peaks at sqrt(a / c)
    lm = quadratic.saturation_length()
    best = max(rate(quadratic, n) for n in range(16, 2049, 16))
    assert rate(quadratic, lm) >= 0.95 * best > rate(quadratic, lm - 16) and lm < 1000
    assert quadratic.saturation_length(step=1) <= lm
    for bad in (dict(share=0.0), dict(share=1.5), dict(step=0), dict(limit=8)):
        with pytest.raises(ValueError):
            quadratic.saturation_length(**bad)


def test_default_prefill_batch_is_the_shipped_profiles_saturation_length():
    """Re-measured docs/profile_cpu.json: revisit DEFAULT_PREFILL_BATCH_TOKENS."""
    from deploy.deployment import DEFAULT_PREFILL_BATCH_TOKENS, ROOT, default_deployment
    from planner.deployment import load_target
    shipped = load_target(ROOT / "docs" / "profile_cpu.json")
    lat = shipped.table.get(shipped.model, shipped.device, 1)
    assert lat.saturation_length() == DEFAULT_PREFILL_BATCH_TOKENS
    assert default_deployment(num_cores=2).prefill.max_num_batched_tokens == DEFAULT_PREFILL_BATCH_TOKENS


def test_profile_roundtrips_through_our_format(tmp_path):
    table = LatencyTable([make_latency()])
    path = tmp_path / "p.json"
    table.save(path)
    back = load_profile(path)
    assert back.get("toy", "cpu", 1) == make_latency()
    assert json.loads(path.read_text())["unit"] == "s"


@needs_anchors
def test_a100_profile_gives_the_readme_examples():
    m = load_profile(A100).get("facebook/opt-13b", "a100-80gb", tp=1)
    assert m.prefill_time([512]) == pytest.approx(0.072, rel=0.01)
    assert m.decode_time(32, 32 * 512) == pytest.approx(0.0315, rel=0.01)
    d = m.with_pp(2)                         # README: prefill T/pp + pp (ms), decode T/pp
    assert d.prefill_time([512]) == pytest.approx(m.prefill_time([512]) / 2 + 0.002)
    assert d.decode_time(32, 32 * 512) == pytest.approx(m.decode_time(32, 32 * 512) / 2)
    cap = load_kv_capacity(anchor_path("distserve-a100-max-num-tokens.csv"))
    assert cap[("opt-13b", 1, 1)] == 66144


def test_unknown_config_raises_with_what_exists():
    with pytest.raises(KeyError, match="toy"):
        LatencyTable([make_latency()]).get("toy", "cpu", tp=4)


# ---- simulator ------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.3, 0.6, 0.8])
def test_md1_mean_ttft_matches_the_formula(rho):
    d = 0.1
    lat = LatencyModel("x", "cpu", 1, (d, 0, 0), (0, 0, 0), (0, 0, 0))
    config = SimConfig("prefill", prefill=InstanceSpec(lat, EngineLimits(1000, max_num_seqs=1)))
    rate = rho / d
    res = simulate(config, [(64, 8)] * 30000, rate, seed=1)
    expected = d + rate * d * d / (2 * (1 - rate * d))
    assert res.mean_ttft() == pytest.approx(expected, rel=0.03)


def disagg_config(**kw) -> SimConfig:
    lat = make_latency()
    base = dict(mode="disaggregated", prefill=InstanceSpec(lat, EngineLimits(64, 8, 512)),
                decode=InstanceSpec(lat, EngineLimits(40, 16, 512)), num_prefill=2, num_decode=3,
                link=Link(1e9, 1e-4), kv_bytes_per_token=1e5)
    return SimConfig(**{**base, **kw})


def run_checked(config: SimConfig, rate: float, n: int = 400, seed: int = 0):
    sim = Simulator(config, make_requests(make_lengths(n, seed), poisson_arrivals(n, rate, seed)))
    res = sim.run()                               # raises if a request is lost or blocks leak
    for e in sim._engines():
        assert e.peak_blocks <= e.blocks.num_blocks
        assert e.blocks.num_used == 0 and not e.scheduler.has_work()
    assert all(r.finish is not None and r.finish >= r.first_token >= r.req.arrival
               for r in res.records)
    return res


@pytest.mark.parametrize("config", [
    disagg_config(),
    disagg_config(num_prefill=1, num_decode=1),
    disagg_config(num_prefill=3, num_decode=1, link=None),
    SimConfig("colocated", prefill=InstanceSpec(make_latency(), EngineLimits(60, 16, 512)), num_prefill=2),
    SimConfig("colocated", prefill=InstanceSpec(make_latency(), EngineLimits(60, 16, 256, chunked_prefill=True))),
    SimConfig("prefill", prefill=InstanceSpec(make_latency(), EngineLimits(64, 8, 512))),
    SimConfig("decode", decode=InstanceSpec(make_latency(), EngineLimits(40, 16, 512))),
], ids=["3p2d", "1p1d", "3p1d", "colocated", "chunked", "prefill-only", "decode-only"])
@pytest.mark.parametrize("rate", [2.0, 50.0])
def test_invariants_hold_from_light_to_overloaded(config, rate):
    res = run_checked(config, rate)
    assert len(res.records) == 400


def test_small_decode_memory_preempts_and_still_drains():
    res = run_checked(disagg_config(decode=InstanceSpec(make_latency(), EngineLimits(24, 16, 512))), 50.0)
    assert sum(s["preempted"] for s in res.stats.values()) > 0


def test_seeded_run_is_repeatable_and_seed_matters():
    a = run_checked(disagg_config(), 20.0, seed=3)
    b = run_checked(disagg_config(), 20.0, seed=3)
    c = run_checked(disagg_config(), 20.0, seed=4)
    key = lambda res: [(r.first_token, r.finish) for r in res.records]
    assert key(a) == key(b) and key(a) != key(c)


def test_kv_transfer_delays_decode_not_first_token():
    big = InstanceSpec(make_latency(), EngineLimits(100_000, 8, 512))    # prefill memory never backs up
    fast = run_checked(disagg_config(prefill=big, link=None), 5.0)
    slow = run_checked(disagg_config(prefill=big, link=Link(1e8, 0.01)), 5.0)
    assert [r.ttft for r in fast.records] == [r.ttft for r in slow.records]
    assert np.mean([r.finish for r in slow.records]) > np.mean([r.finish for r in fast.records])


def test_pipeline_overlaps_batches_but_does_not_cut_latency():
    d = 0.1
    lat = LatencyModel("x", "cpu", 1, (d, 0, 0), (0.02, 0, 0), (0.02, 0, 0)).with_pp(2)
    stage = d / 2 + 2 * 0.001                    # README: T / pp + pp ms, per stage
    config = SimConfig("prefill", prefill=InstanceSpec(lat, EngineLimits(1000, max_num_seqs=1)))
    alone = Simulator(config, make_requests([(8, 2)], [0.0])).run()
    assert alone.records[0].ttft == pytest.approx(2 * stage)
    burst = Simulator(config, make_requests([(8, 2)] * 20, [0.0] * 20)).run()
    firsts = sorted(r.first_token for r in burst.records)
    assert firsts[-1] == pytest.approx(21 * stage)        # a batch enters every stage time
    decode = SimConfig("decode", decode=InstanceSpec(lat, EngineLimits(100, max_num_seqs=256)))
    assert simulate(decode, [(8, 11)], 1.0).records[0].tpot == pytest.approx(0.02)


def test_window_counts_and_stops_on_its_arrivals_only():
    lat = LatencyModel("x", "cpu", 1, (0.1, 0, 0), (0, 0, 0), (0, 0, 0))
    config = SimConfig("prefill", prefill=InstanceSpec(lat, EngineLimits(1000, max_num_seqs=1)))
    # a burst of 10 at t=0 queues (TTFT 0.1 ... 1.0 s), then 10 alone, 1 s apart (TTFT 0.1 s)
    reqs = make_requests([(8, 2)] * 20, [0.0] * 10 + [10.0 + i for i in range(10)])
    res = Simulator(config, reqs, window=(5.0, math.inf)).run()
    assert len(res.measured) == 10 and res.attainment(0.15, 1.0) == 1.0
    assert SimResult(res.records, res.end_time).attainment(0.15, 1.0) == pytest.approx(11 / 20)
    stop = (0.15, 1.0, 0.9)
    assert not Simulator(config, reqs, stop, window=(5.0, math.inf)).run().stopped_early
    assert Simulator(config, reqs, stop).run().stopped_early


def test_fluid_decode_rate_marks_the_memory_cliff():
    lat = LatencyModel("x", "cpu", 1, (0.01, 0, 0), (0.01, 1e-6, 1e-4), (0.01, 1e-6, 1e-4))
    spec = InstanceSpec(lat, EngineLimits(200, max_num_seqs=256))          # 3200 tokens: memory binds
    lengths, slo = [(100, 50)] * 10, SLO(0.25, 0.1)
    fluid = decode_fluid_rate(spec, lengths, slo)
    assert fluid == pytest.approx(31.9, rel=0.03)            # worked by hand: R T (K + 8 O) = 3200
    config = SimConfig("decode", decode=spec)

    def attainment(rate: float) -> float:
        n = int(rate * 40)
        res = simulate(config, lengths * (n // 10), rate, window=(10.0, math.inf))
        return res.attainment(slo.ttft, slo.tpot)
    assert attainment(0.85 * fluid) >= 0.9 > attainment(1.2 * fluid)


def test_request_too_big_for_the_cache_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        Simulator(disagg_config(), make_requests([(2000, 10)], [0.0]))


# ---- search ---------------------------------------------------------------------------------

def test_goodput_bisects_to_the_threshold():
    probe = lambda rate: 1.0 if rate <= 7.3 else 0.5
    assert goodput(probe, 0.9, guess=1.0, rel_tol=0.01) == pytest.approx(7.3, rel=0.011)
    assert goodput(lambda r: 0.0, 0.9, guess=1.0) == 0.0


def test_goodput_never_probes_above_max_rate():
    calls = []
    probe = lambda rate: calls.append(rate) or (1.0 if rate <= 2.5 else 0.0)
    g = goodput(probe, 0.9, guess=3.0, rel_tol=0.02, step=1.1, max_rate=3.0)
    assert 2.5 / 1.02 <= g <= 2.5 and max(calls) == 3.0
    assert goodput(lambda rate: 1.0, 0.9, guess=3.0, max_rate=3.0) == 3.0


def toy_planner(workers: int = 1) -> Planner:
    """tp2 decodes no faster than tp1 (half the goodput per device): branch and bound skips it."""
    models = [LatencyModel("toy", "gpu", tp, (0.02 / tp, 1e-4 / tp, 1e-8), (0.01, 2e-6, 1e-4),
                           (0.01, 2e-6, 2e-4), decode_threshold=32) for tp in (1, 2)]
    capacity = {("toy", tp, pp): 8000 * tp * pp for tp in (1, 2) for pp in (1, 2)}
    space = SearchSpace("toy", LatencyTable(models), capacity, pps=(1, 2), num_requests=100,
                        min_span_s=5.0, window_lifetimes=2.0, workers=workers)
    lengths = [(50 + 7 * i % 200, 5 + i % 30) for i in range(200)]
    return Planner(space, lengths, SLO(0.3, 0.05), Cluster(2, 4, "gpu"))


def test_branch_and_bound_finds_the_exhaustive_best_with_less_work():
    exhaustive = toy_planner().phase_choices("decode")[0]
    planner = toy_planner(workers=2)
    best = planner.best_choice("decode")
    assert best == exhaustive                                # same in worker processes
    assert not planner.is_searched("decode", 2, 1) and not planner.is_searched("decode", 2, 2)


def test_search_work_is_bounded():
    planner = toy_planner()
    low, high = plan_low(planner), plan_high(planner)
    assert low.goodput > 0 and high.goodput > 0
    assert low.goodput <= low.notes["predicted_from_phases"] * (1 + 1e-9)
    assert planner.num_sims <= 60        # deterministic (seeded); 4 prefill + 2 decode searches


def test_pipelined_unit_counts_each_device_once():
    planner = toy_planner()
    placed = plan_fixed(planner, 1, 1, pp=2)           # one unit over both nodes
    assert placed.num_units == 1
    assert placed.num_devices == 2 * (placed.num_prefill + placed.num_decode) <= 8


def test_goodput_of_md1_prefill_meets_ttft_slo():
    d = 0.1
    lat = LatencyModel("x", "cpu", 1, (d, 0, 0), (0, 0, 0), (0, 0, 0))
    config = SimConfig("prefill", prefill=InstanceSpec(lat, EngineLimits(1000, max_num_seqs=1)))
    slo = SLO(ttft=0.4, tpot=1.0)
    probe = lambda r: simulate(config, [(8, 2)] * 3000, r, 0).attainment(slo.ttft, slo.tpot)
    g = goodput(probe, 0.9, guess=2.0, rel_tol=0.02)
    assert 0 < g < 1 / d                         # below the service rate
    assert probe(g) >= 0.9 and probe(g * 1.1) < 0.9
