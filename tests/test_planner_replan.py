"""planner/replan.py: synthetic traces in every accepted format, checked against a deployment."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.deployment import Deployment, PhaseSpec, colocated_deployment, default_deployment
from planner.__main__ import main
from planner.deployment import deployment_configs, load_target
from planner.replan import Trace, evaluate, load_trace
from planner.search import SLO
from tests.test_planner_cli import FAST, write_cpu_profile

SLO_ARGS = ["--ttft", "0.5", "--tpot", "0.1"]


def synthetic_trace(n: int, rate: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    return [{"arrival_s": float(t), "prompt_len": int(p), "output_len": int(o)}
            for t, p, o in zip(arrivals, rng.integers(40, 160, n), rng.integers(4, 24, n))]


@pytest.fixture
def setup(tmp_path):
    profile = write_cpu_profile(tmp_path / "cpu.json")
    default_deployment("models/toy.gguf", 2).save(tmp_path / "dep.json")
    return tmp_path, str(profile)


def write_csv(path, records):
    path.write_text("arrival_s,prompt_len,output_len\n" +
                    "".join(f"{r['arrival_s']},{r['prompt_len']},{r['output_len']}\n" for r in records))
    return path


def test_trace_formats_load_alike(tmp_path):
    records = synthetic_trace(20, 2.0)
    write_csv(tmp_path / "t.csv", records)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "t.json").write_text(json.dumps(records))
    (tmp_path / "run.json").write_text(json.dumps({"kind": "run", "results": records}))
    traces = [load_trace(tmp_path / f) for f in ("t.csv", "t.jsonl", "t.json", "run.json")]
    for t in traces:
        assert t.lengths == traces[0].lengths and t.arrivals == pytest.approx(traces[0].arrivals)
    t = traces[0]
    assert t.rate == pytest.approx(19 / (records[-1]["arrival_s"] - records[0]["arrival_s"]))
    assert min(r.arrival for r in t.requests()) == 0.0


def test_goodput_and_compare_results_pick_a_point_and_a_system(tmp_path):
    def point(rate):
        recs = [{**r, "ttft_s": 0.1, "tpot_s": 0.2 if i % 4 == 0 else 0.05, "num_tokens": r["output_len"]}
                for i, r in enumerate(synthetic_trace(12, rate))]
        return {"rate": rate, "results": recs}
    goodput = {"kind": "goodput", "slo": {"ttft_s": 0.5, "tpot_s": 0.1},
               "points": [point(1.0), point(4.0), point(2.0)]}
    (tmp_path / "g.json").write_text(json.dumps(goodput))
    assert "point at 4 req/s" in load_trace(tmp_path / "g.json").source       # the highest by default
    t = load_trace(tmp_path / "g.json", rate=1.8)
    assert "point at 2 req/s" in t.source and t.slo == (0.5, 0.1)
    assert t.measured_attainment(SLO(0.5, 0.1)) == pytest.approx(0.75)     # every 4th misses TPOT
    dep = json.loads(default_deployment("models/toy.gguf", 2).to_json())
    compare = {"kind": "compare", "slo": goodput["slo"],
               "systems": [{**goodput, "system": {"name": "colocated", "deployment": dep}},
                           {**goodput, "system": {"name": "disaggregated", "deployment": dep}}]}
    (tmp_path / "c.json").write_text(json.dumps(compare))
    t = load_trace(tmp_path / "c.json", system="disaggregated")
    assert "[disaggregated]" in t.source and t.deployment == dep and t.slo == (0.5, 0.1)
    with pytest.raises(ValueError, match="no system 'chunked'"):
        load_trace(tmp_path / "c.json", system="chunked")


def test_bad_traces_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("t,p,o\n0,1,1\n")
    with pytest.raises(ValueError, match="header"):
        load_trace(tmp_path / "a.csv")
    (tmp_path / "b.json").write_text(json.dumps([{"arrival_s": 0, "prompt_len": 0, "output_len": 3}]))
    with pytest.raises(ValueError, match="lengths < 1"):
        load_trace(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps([{"arrival_s": 0, "prompt_len": 3}]))
    with pytest.raises(ValueError, match="no output_len"):
        load_trace(tmp_path / "c.json")


def test_deployment_becomes_simulator_configs(setup):
    tmp_path, profile = setup
    target = load_target(profile)
    dis = deployment_configs(Deployment.load(tmp_path / "dep.json", check_host=False), target)["disaggregated"]
    assert (dis.num_prefill, dis.num_decode) == (1, 1)
    assert dis.prefill.limits.num_kv_blocks == 512 and dis.decode.limits.max_num_seqs == 32     # the deployment's limits
    assert dis.link == target.link and dis.kv_bytes_per_token == 23040
    colo = deployment_configs(colocated_deployment("models/toy.gguf", 2, chunked_prefill=True), target)
    assert list(colo) == ["colocated"] and colo["colocated"].prefill.limits.chunked_prefill
    wide = Deployment("m", PhaseSpec(devices=((0, 1),)), PhaseSpec(devices=((2,),)), check_host=False)
    with pytest.raises(KeyError, match="tp=2"):                  # only tp1 was profiled
        deployment_configs(wide, target)


def test_light_trace_meets_and_the_planner_keeps_the_deployment(setup, capsys):
    tmp_path, profile = setup
    write_csv(tmp_path / "t.csv", synthetic_trace(60, 2.0))
    assert main(["replan", "--trace", str(tmp_path / "t.csv"), "--deployment", str(tmp_path / "dep.json"),
                 "--profile", profile, *SLO_ARGS, *FAST, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "MEETS the target" in out and "(the current deployment)" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    cur = doc["current"]["disaggregated"]
    assert cur["trace"]["meets"] and cur["goodput"] > doc["trace"]["rate"]
    assert doc["planner"]["devices"] == "1x2" and doc["planner"]["chosen"]["same_as_current"]
    assert doc["planner"]["colocated"]["num_prefill"] == 2
    sized = doc["sized_for_trace"]
    assert sized["trace"]["meets"] and sized["num_devices"] == 2 and sized["grown"] == 0


def test_heavy_trace_misses_and_is_sized_up(setup, capsys):
    tmp_path, profile = setup
    records = synthetic_trace(150, 40.0, seed=1)
    (tmp_path / "run.json").write_text(json.dumps({"results": records, "slo": {"ttft_s": 0.5, "tpot_s": 0.1}}))
    assert main(["replan", "--trace", str(tmp_path / "run.json"), "--deployment", str(tmp_path / "dep.json"),
                 "--profile", profile, *FAST, "--json", str(tmp_path / "r.json")]) == 0   # SLO from the file
    assert "MISSES the target" in capsys.readouterr().out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["slo"]["ttft"] == 0.5
    cur = doc["current"]["disaggregated"]
    assert not cur["trace"]["meets"] and cur["goodput"] < doc["trace"]["rate"]
    sized = doc["sized_for_trace"]
    assert sized["num_devices"] > 2 and sized["num_prefill"] > 1
    assert sized["trace"]["attainment"] > cur["trace"]["attainment"]


def test_replan_needs_a_deployment_and_slos(setup):
    tmp_path, profile = setup
    write_csv(tmp_path / "t.csv", synthetic_trace(5, 1.0))
    with pytest.raises(SystemExit, match="--deployment"):
        main(["replan", "--trace", str(tmp_path / "t.csv"), "--profile", profile, *SLO_ARGS])
    with pytest.raises(SystemExit, match="--ttft and --tpot"):
        main(["replan", "--trace", str(tmp_path / "t.csv"), "--profile", profile,
              "--deployment", str(tmp_path / "dep.json")])


def test_evaluate_is_the_simulated_attainment(setup):
    tmp_path, profile = setup
    target = load_target(profile)
    config = deployment_configs(default_deployment("m", 2), target)["disaggregated"]
    trace = Trace((0.0, 10.0), ((100, 10), (100, 10)), "two")
    ev = evaluate(config, trace, SLO(1.0, 1.0))
    assert ev["attainment"] == 1.0 and ev["ttft_p50_s"] == pytest.approx(target.table.get(
        target.model, "cpu-core", 1).prefill_time([100]), rel=1e-6)


def test_requests_too_long_for_the_slo_are_called_out(setup, capsys):
    tmp_path, profile = setup
    records = synthetic_trace(20, 1.0)
    for r in records[::2]:
        r["prompt_len"] = 2000                  # 1.4 s of prefill alone, TTFT SLO 0.5 s
    write_csv(tmp_path / "t.csv", records)
    assert main(["replan", "--trace", str(tmp_path / "t.csv"), "--deployment", str(tmp_path / "dep.json"),
                 "--profile", profile, *SLO_ARGS, *FAST, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "50% of the trace's requests miss the SLOs even alone" in out
    assert "goodput 0: no rate reaches the target" in out and "no placement reaches the target" in out
    assert json.loads((tmp_path / "r.json").read_text())["trace"]["alone_miss"] == 0.5
