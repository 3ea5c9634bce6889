"""The headline comparison's pieces that need no server: system names, the time breakdown,
the labels, the summary table (a real multi-system run is in tests/integration and docs/goodput)."""
from __future__ import annotations

import pytest

from client.bench.cli import PAPER_SLO_MULTIPLES, parse_args
from client.bench.compare import System, markdown, parse_system, parse_systems, placement, _strip
from client.bench.metrics import RequestResult, route_counts, time_breakdown
from deploy.deployment import DEFAULT_CHUNKED_TOKEN_BUDGET


def test_system_names_and_deployments():
    assert parse_system("chunked") == System("chunked", DEFAULT_CHUNKED_TOKEN_BUDGET)
    s = parse_system("chunked-256")
    assert (s.name, s.model, s.token_budget) == ("chunked-256", "distserve_colocated", 256)
    d = s.deployment("models/x.gguf", num_cores=2)
    assert d.systems == ("colocated",) and d.colocated.chunked_prefill
    assert d.colocated.max_num_batched_tokens == 256 and d.colocated.devices == ((0,), (1,))
    dis = parse_system("disaggregated").deployment("models/x.gguf", num_cores=2)
    assert dis.systems == ("disaggregated",) and dis.prefill.devices != dis.decode.devices
    ada = parse_system("adaptive")
    d = ada.deployment("models/x.gguf", num_cores=2)
    assert ada.model == "distserve" and d.serving_mode == "adaptive" and d.decode.chunked_prefill
    shared = parse_system("adaptive-shared")
    with pytest.warns(UserWarning, match="share cores"):           # on purpose: said, not hidden
        d = shared.deployment("models/x.gguf", num_cores=2)
    assert shared.model == "distserve" and d.serving_mode == "adaptive"
    assert d.decode.devices == ((1,), (0,)) and d.prefill.devices == ((0,),)
    from client.bench.compare import without_prefix_caching
    for dep in (d, parse_system("chunked").deployment("models/x.gguf", num_cores=2)):
        assert all(p.prefix_caching for p in (dep.prefill, dep.decode, dep.colocated) if p)
        off = without_prefix_caching(dep)
        assert not any(p.prefix_caching or p.draft_corpus for p in (off.prefill, off.decode, off.colocated) if p)
    for bad in ("vllm", "chunked-0", "chunked-x"):
        with pytest.raises(ValueError, match="system|budget"):
            parse_system(bad)
    with pytest.raises(Exception, match="distinct"):
        parse_systems("colocated,colocated")


def test_labels_name_the_instances_and_cores_served():
    dis = parse_system("disaggregated")
    assert dis.label(dis.deployment("m.gguf", num_cores=2)) == \
        "DistServe: 1 prefill on core 0 + 1 decode on core 1"
    assert dis.label(dis.deployment("m.gguf", num_cores=8)) == \
        "DistServe: 1 prefill on cores 0-3 + 1 decode on cores 4-7"
    chunked = parse_system("chunked-256")
    assert chunked.label(chunked.deployment("m.gguf", num_cores=2)) == \
        "colocated + chunked prefill (budget 256): 2 instances on cores 0 and 1"
    with pytest.warns(UserWarning, match="share cores"):
        shared = parse_system("adaptive-shared").deployment("m.gguf", num_cores=2)
    assert placement(shared) == "1 prefill on core 0 + 2 decode on cores 1 and 0"
    from dataclasses import replace
    from deploy.deployment import PhaseSpec
    gpu = replace(dis.deployment("m.gguf", num_cores=2), check_host=False,
                  prefill=PhaseSpec(device="gpu", devices=(0,), num_kv_blocks=512),
                  decode=PhaseSpec(device="gpu", num_instances=2, devices=(1, 2), num_kv_blocks=1024))
    assert placement(gpu) == "1 prefill on GPU 0 + 2 decode on GPUs 1 and 2"


def test_compare_defaults_to_the_papers_slo_multiples():
    args = parse_args(["compare", "--workload", "code"])
    assert (args.slo_ttft, args.slo_tpot) == PAPER_SLO_MULTIPLES["code"]
    assert [s.name for s in args.systems] == ["disaggregated", "colocated", f"chunked-{DEFAULT_CHUNKED_TOKEN_BUDGET}"]
    args = parse_args(["compare", "--slo-ttft", "3", "--slo-tpot", "2", "--systems", "colocated,chunked-64"])
    assert (args.slo_ttft, args.slo_tpot) == (3, 2) and len(args.systems) == 2
    with pytest.raises(SystemExit):
        parse_args(["compare", "--slo-ttft", "3"])
    from pathlib import Path
    assert parse_args(["compare"]).out_dir == Path("results/goodput")       # untracked, not docs/
    assert parse_args(["compare", "--out-dir", "docs/goodput"]).out_dir == Path("docs/goodput")


def _result(i, ttft, e2e, timing, error=None):
    tpot = None if error else (e2e - ttft) / 10
    return RequestResult(i, 100, 11, 0.0, 0.0, ttft, tpot, e2e, 0 if error else 11,
                         "length", error, timing)


def test_time_breakdown_splits_ttft_and_the_hand_off():
    dis = {"prefill_queue_s": 0.2, "prefill_s": 0.5, "first_token_at": 10.0,
           "decode_admitted_at": 10.3, "kv_transfer_s": 0.01}
    rows = [_result(0, 1.0, 3.0, dis), _result(1, 0.8, 2.0, dis | {"prefill_queue_s": 0.0}),
            _result(2, None, None, None, error="boom")]             # a failure is not timed
    b = time_breakdown(rows)
    assert b["num_requests"] == 2
    assert b["ttft"] == pytest.approx(0.9) and b["queue"] == pytest.approx(0.1)
    assert b["ttft_other"] == pytest.approx(0.9 - 0.1 - 0.5)
    assert b["handoff"] == pytest.approx(0.3) and b["transfer"] == pytest.approx(0.01)
    assert b["decode"] == pytest.approx((3.0 - 1.0 - 0.3 + 2.0 - 0.8 - 0.3) / 2)
    col = time_breakdown([_result(0, 1.0, 3.0, {"prefill_queue_s": 0.4, "prefill_s": 0.3})])
    assert col["handoff"] == 0 and col["decode"] == pytest.approx(2.0)
    assert time_breakdown([]) == {}
    routed = [_result(i, 1.0, 3.0, {"route": {"kind": k}}) for i, k in enumerate(["local", "split", "local"])]
    assert route_counts(routed) == {"local": 2, "split": 1} and route_counts(rows) == {}
    from client.bench.metrics import SLO, summarize
    routed[0].server_timing.ttft_s = 0.5
    assert summarize(routed, SLO(10.0, 1.0))["server_timing_mean"] == {"ttft_s": 0.5}   # no `route`


def _doc(name, goodput, atts, cores):
    deployment = {"systems": ["colocated"], "colocated": {"devices": [[c] for c in range(cores)]}} \
        if name != "disaggregated" else {"systems": ["disaggregated"], "prefill": {"devices": [[0]]},
                                         "decode": {"devices": [[1]]}}
    res = _result(0, 1.0, 3.0, {"prefill_queue_s": 0.1, "prefill_s": 0.5}).to_json()
    return {"label": name, "goodput_rps": goodput, "is_capped": False,
            "system": {"name": name, "deployment": deployment, "load_avg_before": [1.0, 1, 1],
                       "load_avg_after": [2.0, 1, 1], "seconds": 120},
            "points": [{"rate": r, "attainment": a, "summary": {"ttft_attainment": a, "tpot_attainment": 1.0},
                        "results": [res]} for r, a in atts]}


def test_summary_table_has_ratios_against_colocated():
    summary = {"command": "python -m client.bench compare", "created": "now", "target": 0.9,
               "workload": {"name": "chatbot", "num_requests": 40, "seed": 0,
                            "caps": {"max_prompt_tokens": 512, "prompt_scale": 1.0},
                            "lengths": {"prompt": {"p50": 300, "mean": 310}, "output": {"p50": 60, "mean": 70}}},
                   "slo": {"mode": "absolute", "ttft_s": 1.0, "tpot_s": 0.2},
                   "systems": [_strip(_doc("disaggregated", 0.8, [(0.4, 1.0), (0.8, 0.95), (1.6, 0.2)], 2)),
                               _strip(_doc("colocated", 0.4, [(0.4, 0.92), (0.8, 0.5)], 2))]}
    md = markdown(summary, ["a.png"])
    assert "| disaggregated | 0.8 | 0.4 | 2.00x |" in md
    assert "| colocated | 0.4 | 0.2 | 1.00x |" in md
    assert "0.4 (100%), 0.8 (95%), 1.6 (20%)" in md
    assert "| disaggregated | 0.8 | 1.000 | 0.100 | 0.500 | 0.400 |" in md
    assert "results" not in summary["systems"][0]["points"][0]
    assert "Where the router sent" not in md                  # no adaptive system here


def test_baseline_requests_are_those_near_the_p90_prompt():
    from client.bench.cli import baseline_requests
    from client.bench.pools import Request
    reqs = [Request((1,) * n, out, str(i)) for i, (n, out) in
            enumerate([(10, 5), (20, 5), (30, 1), (40, 5), (50, 5), (60, 5), (70, 5), (80, 5), (90, 5), (100, 5)])]
    picked = baseline_requests(reqs, 3, 0.9)
    assert [r.prompt_len for r in picked] == [80, 90, 100]          # in workload order
    assert [r.prompt_len for r in baseline_requests(reqs, 2, 0.5)] == [50, 60]
    assert all(r.output_len >= 2 for r in baseline_requests(reqs, 9, 0.0))
    with pytest.raises(ValueError):
        baseline_requests(reqs, 3, 1.5)


def test_speculative_variants():
    s = parse_system("disaggregated+ngram")
    assert (s.kind, s.speculative, s.name, s.model) == ("disaggregated", "ngram", "disaggregated+ngram",
                                                        "distserve")
    d = s.deployment("m.gguf", num_cores=2)
    assert d.decode.speculative == "ngram" and d.prefill.speculative is None
    assert s.label(d) == ("DistServe, speculative decoding (ngram drafter, adaptive k): "
                          "1 prefill on core 0 + 1 decode on core 1")
    c = parse_system("chunked-256+ngram")
    assert c.name == "chunked-256+ngram" and c.deployment("m.gguf", num_cores=2).colocated.speculative == "ngram"
    assert parse_system("disaggregated").deployment("m.gguf", num_cores=2).decode.speculative is None
    parse_systems("disaggregated,disaggregated+ngram,disaggregated+ngram@0")   # distinct names
    r = parse_system("disaggregated+ngram@0")
    d = r.deployment("m.gguf", num_cores=2)
    assert r.name == "disaggregated+ngram@0" and d.decode.draft_devices == ((0,),)
    assert "ngram drafter in a process on core 0" in r.label(d)
    m = parse_system("disaggregated+model").deployment("m.gguf", num_cores=2)
    assert (m.decode.speculative, m.decode.draft_model, m.decode.draft_devices) == ("model", "m.gguf", None)
    for bad in ("disaggregated+medusa", "disaggregated+ngram@x"):
        with pytest.raises(ValueError, match="drafter"):
            parse_system(bad)
    with pytest.raises(ValueError, match="system"):
        parse_system("vllm+ngram")


def test_every_system_serves_the_runs_slos(monkeypatch):
    """The router's SLOs, and every system's overload limit (overload_factor x its TTFT SLO), are
    the run's from the first system on: absolute SLOs are known before any server starts (an
    adaptive system listed first was served with the deployment's defaults once; a split system
    of a summarization run refused prompts queued behind one 8.6 s prefill, at a 4 s default
    against the run's 34 s); a relative SLO measured on an adaptive first system is refused."""
    import deploy.render
    from client.bench.compare import run_compare
    served = []

    class Stop(Exception):
        pass

    def render(deployment, *a, **kw):
        served.append(deployment)
        raise Stop
    monkeypatch.setattr(deploy.render, "render_repository", render)
    args = parse_args(["compare", "--workload", "code", "--num-requests", "4", "--slo-mode", "absolute",
                       "--slo-ttft", "1.5", "--slo-tpot", "0.05", "--systems", "adaptive-shared,chunked"])
    with pytest.warns(UserWarning, match="share cores"), pytest.raises(Stop):
        run_compare(args)
    assert (served[0].slo_ttft_s, served[0].slo_tpot_s) == (1.5, 0.05)
    split = parse_args(["compare", "--workload", "code", "--num-requests", "4", "--slo-mode", "absolute",
                        "--slo-ttft", "30", "--slo-tpot", "0.08", "--systems", "disaggregated"])
    with pytest.raises(Stop):
        run_compare(split)
    assert (served[1].slo_ttft_s, served[1].slo_tpot_s) == (30, 0.08)
    del served[1]
    relative = parse_args(["compare", "--workload", "code", "--num-requests", "4",
                           "--systems", "adaptive,colocated"])
    with pytest.raises(ValueError, match="non-adaptive system first"):
        run_compare(relative)
    given = parse_args(["compare", "--workload", "code", "--num-requests", "4", "--baseline-ttft", "0.1",
                        "--baseline-tpot", "0.02", "--systems", "adaptive,colocated"])
    with pytest.raises(Stop):
        run_compare(given)
    t, p = PAPER_SLO_MULTIPLES["code"]
    assert served[1].slo_ttft_s == pytest.approx(0.1 * t) and served[1].slo_tpot_s == pytest.approx(0.02 * p)
