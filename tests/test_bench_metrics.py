"""Metric math of the goodput benchmark on hand-made timelines (client/bench/metrics.py)."""
from __future__ import annotations

import pytest

from client.bench.metrics import SLO, RequestResult, Timeline, attainment, meets, slo_scale_sweep, summarize


def timeline(send: float, token_times: list[tuple[float, int]], end: float | None = None,
             error: str | None = None, index: int = 0) -> RequestResult:
    t = Timeline(index, prompt_len=10, output_len=sum(n for _, n in token_times) or 5, arrival_s=send)
    t.sent(send)
    for now, n in token_times:
        t.tokens(now, n)
    t.finished(end if end is not None else (token_times[-1][0] if token_times else send), error)
    return t.result()


def test_ttft_tpot_e2e_from_a_timeline():
    # sent at 1.0; tokens at 1.5, 1.6, 1.7, 1.9 (one each); done at 2.0
    r = timeline(1.0, [(1.5, 1), (1.6, 1), (1.7, 1), (1.9, 1)], end=2.0)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx((1.9 - 1.5) / 3)
    assert r.e2e_s == pytest.approx(1.0)
    assert r.num_tokens == 4


def test_tpot_counts_tokens_not_responses():
    # 1 token first, then one response with 4 tokens: 5 tokens, (t_last - t_first) / 4
    r = timeline(0.0, [(0.2, 1), (1.0, 4)])
    assert r.num_tokens == 5
    assert r.tpot_s == pytest.approx(0.8 / 4)


def test_responses_without_tokens_do_not_move_first_or_last_token():
    r = timeline(0.0, [(0.1, 0), (0.3, 1), (0.5, 1), (0.9, 0)], end=1.0)
    assert r.ttft_s == pytest.approx(0.3)
    assert r.tpot_s == pytest.approx(0.2)
    assert r.e2e_s == pytest.approx(1.0)


def test_one_token_output_has_no_tpot_and_meets_any_tpot_slo():
    r = timeline(0.0, [(0.2, 1)])
    assert r.ok and r.num_tokens == 1
    assert r.tpot_s is None
    assert meets(r, SLO(ttft_s=0.25, tpot_s=1e-9))
    assert not meets(r, SLO(ttft_s=0.1, tpot_s=1.0))


def test_failures_are_results_and_miss_every_slo():
    errored = timeline(0.0, [(0.1, 1), (0.2, 1)], error="DistServeError: boom")
    empty = timeline(0.0, [], end=0.5)
    assert not errored.ok and errored.error == "DistServeError: boom"
    assert errored.ttft_s == pytest.approx(0.1)      # what happened is still recorded
    assert not empty.ok and "without a token" in empty.error
    huge = SLO(1e9, 1e9)
    assert not meets(errored, huge) and not meets(empty, huge)
    assert attainment([errored, empty], huge) == 0.0


def test_attainment_is_joint_over_all_requests():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    results = [
        timeline(0, [(0.5, 1), (0.55, 1)]),          # both met
        timeline(0, [(1.5, 1), (1.55, 1)]),          # TTFT missed
        timeline(0, [(0.5, 1), (0.8, 1)]),           # TPOT missed (0.3)
        timeline(0, [(0.9, 1), (1.0, 1)]),           # both met exactly at the limit
        timeline(0, [(0.2, 1)], error="timeout"),    # failed
    ]
    assert [meets(r, slo) for r in results] == [True, False, False, True, False]
    assert attainment(results, slo) == pytest.approx(2 / 5)
    s = summarize(results, slo)
    assert (s["num_requests"], s["num_ok"], s["num_failed"]) == (5, 4, 1)
    assert s["attainment"] == pytest.approx(0.4)
    assert s["ttft_attainment"] == pytest.approx(3 / 5)
    assert s["tpot_attainment"] == pytest.approx(3 / 5)
    assert s["errors"] == {"timeout": 1}


def test_attainment_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        attainment([], SLO(1, 1))


def test_slo_scale_sweep_is_monotone_and_hits_the_ends():
    results = [timeline(0, [(0.1 * k, 1), (0.1 * k + 0.01 * k, 1)]) for k in range(1, 11)]
    slo = SLO(ttft_s=0.55, tpot_s=0.055)
    att = slo_scale_sweep(results, slo, [0.1, 0.5, 1.0, 2.0, 10.0])
    assert att == sorted(att)
    assert att[0] == 0.0 and att[-1] == 1.0
    assert att[2] == pytest.approx(0.5)      # k <= 5 meet both at scale 1


def test_slo_must_be_positive():
    with pytest.raises(ValueError):
        SLO(0.0, 0.1)


def test_result_json_round_trip():
    r = timeline(0.0, [(0.2, 1), (0.4, 1)], error=None)
    assert RequestResult.from_json(r.to_json()) == r
