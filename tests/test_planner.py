"""Planner: latency model and fit, simulator (M/D/1, determinism, invariants), goodput search."""
from __future__ import annotations

import json

import numpy as np
import pytest

from planner.latency import (LatencyModel, LatencyTable, Link, anchor_path, fit_model,
                             load_kv_capacity, load_profile)
from planner.search import SLO, goodput
from planner.simulator import InstanceSpec, SimConfig, Simulator, make_requests, poisson_arrivals, simulate

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
    config = SimConfig("prefill", prefill=InstanceSpec(lat, 1000, max_num_seqs=1))
    rate = rho / d
    res = simulate(config, [(64, 8)] * 30000, rate, seed=1)
    expected = d + rate * d * d / (2 * (1 - rate * d))
    assert res.mean_ttft() == pytest.approx(expected, rel=0.03)


def disagg_config(**kw) -> SimConfig:
    lat = make_latency()
    base = dict(mode="disaggregated", prefill=InstanceSpec(lat, 64, 8, 512),
                decode=InstanceSpec(lat, 40, 16, 512), num_prefill=2, num_decode=3,
                link=Link(1e9, 1e-4), kv_bytes_per_token=1e5)
    return SimConfig(**{**base, **kw})


def run_checked(config: SimConfig, rate: float, n: int = 400, seed: int = 0):
    sim = Simulator(config, make_requests(make_lengths(n, seed), poisson_arrivals(n, rate, seed)))
    res = sim.run()                               # raises if a request is lost or blocks leak
    for e in sim._engines():
        assert e.peak_blocks <= e.blocks.num_blocks
        assert e.blocks.num_used == 0 and not e.scheduler.running and not e.pending
    assert all(r.finish is not None and r.finish >= r.first_token >= r.req.arrival
               for r in res.records)
    return res


@pytest.mark.parametrize("config", [
    disagg_config(),
    disagg_config(num_prefill=1, num_decode=1),
    disagg_config(num_prefill=3, num_decode=1, link=None),
    SimConfig("colocated", prefill=InstanceSpec(make_latency(), 60, 16, 512), num_prefill=2),
    SimConfig("colocated", prefill=InstanceSpec(make_latency(), 60, 16, 256, chunked_prefill=True)),
    SimConfig("prefill", prefill=InstanceSpec(make_latency(), 64, 8, 512)),
    SimConfig("decode", decode=InstanceSpec(make_latency(), 40, 16, 512)),
], ids=["3p2d", "1p1d", "3p1d", "colocated", "chunked", "prefill-only", "decode-only"])
@pytest.mark.parametrize("rate", [2.0, 50.0])
def test_invariants_hold_from_light_to_overloaded(config, rate):
    res = run_checked(config, rate)
    assert len(res.records) == 400


def test_small_decode_memory_preempts_and_still_drains():
    res = run_checked(disagg_config(decode=InstanceSpec(make_latency(), 24, 16, 512)), 50.0)
    assert sum(s["preempted"] for s in res.stats.values()) > 0


def test_seeded_run_is_repeatable_and_seed_matters():
    a = run_checked(disagg_config(), 20.0, seed=3)
    b = run_checked(disagg_config(), 20.0, seed=3)
    c = run_checked(disagg_config(), 20.0, seed=4)
    key = lambda res: [(r.first_token, r.finish) for r in res.records]
    assert key(a) == key(b) and key(a) != key(c)


def test_kv_transfer_delays_decode_not_first_token():
    big = InstanceSpec(make_latency(), 100_000, 8, 512)    # prefill memory never backs up
    fast = run_checked(disagg_config(prefill=big, link=None), 5.0)
    slow = run_checked(disagg_config(prefill=big, link=Link(1e8, 0.01)), 5.0)
    assert [r.ttft for r in fast.records] == [r.ttft for r in slow.records]
    assert np.mean([r.finish for r in slow.records]) > np.mean([r.finish for r in fast.records])


def test_request_too_big_for_the_cache_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        Simulator(disagg_config(), make_requests([(2000, 10)], [0.0]))


# ---- search ---------------------------------------------------------------------------------

def test_goodput_bisects_to_the_threshold():
    probe = lambda rate: 1.0 if rate <= 7.3 else 0.5
    assert goodput(probe, 0.9, guess=1.0, rel_tol=0.01) == pytest.approx(7.3, rel=0.011)
    assert goodput(lambda r: 0.0, 0.9, guess=1.0) == 0.0


def test_goodput_of_md1_prefill_meets_ttft_slo():
    d = 0.1
    lat = LatencyModel("x", "cpu", 1, (d, 0, 0), (0, 0, 0), (0, 0, 0))
    config = SimConfig("prefill", prefill=InstanceSpec(lat, 1000, max_num_seqs=1))
    slo = SLO(ttft=0.4, tpot=1.0)
    probe = lambda r: simulate(config, [(8, 2)] * 3000, r, 0).attainment(slo.ttft, slo.tpot)
    g = goodput(probe, 0.9, guess=2.0, rel_tol=0.02)
    assert 0 < g < 1 / d                         # below the service rate
    assert probe(g) >= 0.9 and probe(g * 1.1) < 0.9
