"""Goodput search and SLO sweeps on a synthetic server model (client/bench/goodput.py), and the
plots drawn from their result documents. No server."""
from __future__ import annotations

import json
import math

import pytest

from client.bench.goodput import Baseline, baseline_from, search_goodput, sweep
from client.bench.metrics import SLO, RequestResult

D = 0.1                 # prefill time of one request (s): the server saturates at 1 / D = 10 rps
TPOT = 0.02
N = 2000


def md1_server(rate: float, tpot_growth: float = 0.0) -> list[RequestResult]:
    """TTFT = D + wait, wait exponential with the M/D/1 mean R*D^2 / (2 (1 - R*D)), laid out at
    exact quantiles so attainment is deterministic; past saturation every request times out."""
    results = []
    for i in range(N):
        if rate * D >= 1:
            results.append(RequestResult(i, 100, 50, i / rate, i / rate, error="timeout"))
            continue
        mean_wait = rate * D * D / (2 * (1 - rate * D))
        wait = -mean_wait * math.log(1 - (i + 0.5) / N)
        results.append(RequestResult(i, 100, 50, i / rate, i / rate, ttft_s=D + wait,
                                     tpot_s=TPOT * (1 + tpot_growth * rate), num_tokens=50))
    return results


def md1_threshold(slo_ttft: float, target: float = 0.9) -> float:
    """The rate where P(D + wait <= slo) = target: mean wait (slo - D) / ln(1 / (1 - target))."""
    w = (slo_ttft - D) / math.log(1 / (1 - target))
    return 2 * w / (D * D + 2 * w * D)


@pytest.mark.parametrize("start_rate", [0.5, 3.0, 9.0])
def test_binary_search_finds_the_md1_threshold(start_rate):
    slo = SLO(ttft_s=0.3, tpot_s=1.0)
    expected = md1_threshold(slo.ttft_s)                 # ~6.97 rps
    calls = []
    found = search_goodput(lambda r: calls.append(r) or md1_server(r), slo, target=0.9,
                           start_rate=start_rate, rel_tol=0.01, max_measurements=30)
    assert found.goodput_rps <= expected + 0.02          # the passing side of the threshold
    assert found.goodput_rps == pytest.approx(expected, rel=0.02)
    assert found.fail_rps is not None and found.fail_rps > expected - 0.02
    assert [p.rate for p in found.points] == calls       # each rate measured once, all kept
    assert len(set(calls)) == len(calls)
    assert all(p.attainment >= 0.9 for p in found.points if p.rate <= found.goodput_rps)


def test_search_on_a_tpot_bound_server():
    # TPOT grows with the rate: 0.02 * (1 + 0.5 R) <= 0.05  <=>  R <= 3
    slo = SLO(ttft_s=10.0, tpot_s=0.05)
    found = search_goodput(lambda r: md1_server(r, tpot_growth=0.5), slo, start_rate=1.0,
                           rel_tol=0.005, max_measurements=40)
    assert found.goodput_rps == pytest.approx(3.0, rel=0.01)


def test_search_reports_zero_when_no_rate_passes_and_a_cap_when_all_do():
    never = search_goodput(lambda r: md1_server(r), SLO(ttft_s=0.05, tpot_s=1.0), start_rate=1.0,
                           min_rate=0.1)
    assert never.goodput_rps == 0.0 and not never.is_capped
    assert min(p.rate for p in never.points) == pytest.approx(0.1)
    always = search_goodput(lambda r: md1_server(min(r, 1.0)), SLO(ttft_s=5.0, tpot_s=1.0),
                            start_rate=1.0, max_rate=8.0)
    assert always.goodput_rps == 8.0 and always.fail_rps is None and always.is_capped


def test_search_respects_the_measurement_budget():
    found = search_goodput(lambda r: md1_server(r), SLO(0.3, 1.0), start_rate=0.1,
                           rel_tol=1e-6, max_measurements=5)
    assert len(found.points) == 5


def test_search_validates_its_arguments():
    with pytest.raises(ValueError):
        search_goodput(md1_server, SLO(1, 1), target=1.5)
    with pytest.raises(ValueError):
        search_goodput(md1_server, SLO(1, 1), start_rate=0.0)


def test_sweep_at_one_rate():
    results = md1_server(6.0)                      # mean wait 6 * 0.01 / (2 * 0.4) = 75 ms
    scales = [0.3, 0.4, 1.0, 2.0]
    points = sweep(results, SLO(0.3, 0.1), scales)
    assert [p["scale"] for p in points] == scales
    expected = [0.0] + [1 - math.exp(-(0.3 * s - D) / 0.075) for s in scales[1:]]
    assert [p["attainment"] for p in points] == pytest.approx(expected, abs=0.002)


def test_relative_slos_from_a_baseline():
    results = [RequestResult(i, 10, 8, 0.0, 0.0, ttft_s=t, tpot_s=p, num_tokens=8)
               for i, (t, p) in enumerate([(0.2, 0.03), (0.1, 0.02), (0.3, 0.05)])]
    results.append(RequestResult(3, 10, 8, 0.0, 0.0, error="boom"))
    base = baseline_from(results)
    assert base == Baseline(ttft_s=0.2, tpot_s=0.03, num_requests=3)
    slo = base.slo(ttft_multiple=5, tpot_multiple=2)
    assert (slo.ttft_s, slo.tpot_s) == pytest.approx((1.0, 0.06))
    with pytest.raises(RuntimeError, match="boom"):
        baseline_from([results[3]])


def test_plots_of_several_systems(tmp_path):
    from client.bench.cli import main
    from client.bench.metrics import summarize
    slo = SLO(0.3, 0.1)
    files = []
    for name, scale in (("fast", 1.0), ("slow", 2.0)):
        found = search_goodput(lambda r: md1_server(r * scale), slo, start_rate=2.0, rel_tol=0.05)
        rate = found.goodput_rps
        doc = {"kind": "goodput", "label": name, "workload": {"name": "chatbot"},
               "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "target": 0.9,
               "goodput_rps": rate,
               "points": [{"rate": p.rate, "attainment": p.attainment,
                           "summary": summarize(p.results, slo),
                           "results": [r.to_json() for r in p.results[:200]]} for p in found.points],
               "sweep": {"rate": rate, "scales": [0.5, 1.0, 2.0]}}
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(doc))
    assert main(["plot", *map(str, files), "--out-dir", str(tmp_path / "plots")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["attainment_vs_rate.png", "attainment_vs_slo_scale.png", "latency_cdf.png"]
    assert all((tmp_path / "plots" / p).stat().st_size > 10_000 for p in pngs)
