"""planner.fidelity: a compare result's deployments become the right SimConfigs, and a
measurement that *is* the simulator's timeline is reproduced exactly (0 pp)."""
from __future__ import annotations

import pytest

from deploy.deployment import colocated_deployment, default_deployment
from planner.deployment import Target, deployment_configs
from planner.fidelity import measured_point, run
from planner.latency import LatencyModel, LatencyTable, Link
from planner.simulator import Request, Simulator

LAT = LatencyModel("toy", "cpu-core", 1, prefill=(0.01, 1e-3, 1e-7), decode_small=(0.03, 1e-6, 2e-3),
                   decode_large=(0.03, 1e-6, 2e-3))
SLO = {"ttft_s": 0.5, "tpot_s": 0.05}
LINK = Link(5e9, 1e-3)
TARGET = Target(LatencyTable([LAT]), "toy", "cpu-core", {}, 100.0, LINK, {"device": "cpu-core"})


def sim_config(deployment):
    return deployment_configs(deployment, TARGET)[deployment.systems[0]]


def test_deployments_become_sim_configs():
    dis = sim_config(default_deployment("m.gguf", 2))
    assert dis.mode == "disaggregated" and (dis.num_prefill, dis.num_decode) == (1, 1)
    assert dis.prefill.limits.num_kv_blocks == 512 and dis.decode.limits.max_num_seqs == 32
    assert dis.link == LINK and dis.kv_bytes_per_token == 100.0
    col = sim_config(colocated_deployment("m.gguf", 2, chunked_prefill=True, token_budget=64))
    assert col.mode == "colocated" and col.num_prefill == 2
    assert col.prefill.limits.chunked_prefill and col.prefill.limits.max_num_batched_tokens == 64


def _fake_measurement(config, rate, n=40):
    """Per-request result records as the benchmark writes them, taken from a simulation."""
    requests = [Request(i, i / rate, 50 + 37 * i % 400, 2 + 13 * i % 60) for i in range(n)]
    sim = Simulator(config, requests).run()
    return [{"arrival_s": r.req.arrival, "prompt_len": r.req.prompt_len, "output_len": r.req.output_len,
             "ttft_s": r.ttft, "tpot_s": r.tpot if r.req.output_len > 1 else None,
             "num_tokens": r.req.output_len, "error": None} for r in sim.records]


@pytest.mark.parametrize("make", [lambda: default_deployment("m.gguf", 2),
                                  lambda: colocated_deployment("m.gguf", 2)])
def test_a_simulated_measurement_is_reproduced(make):
    dep = make()
    config = sim_config(dep)
    deployment, name = dep.to_dict(), dep.systems[0]
    points = [{"rate": r, "results": _fake_measurement(config, r)} for r in (1.0, 4.0, 16.0)]
    compare = {"command": "x", "workload": {"name": "toy", "num_requests": 40}, "slo": SLO,
               "systems": [{"label": name, "system": {"name": name, "deployment": deployment},
                            "points": points}]}
    out = run(compare, TARGET)
    atts = [p["measured"]["attainment"] for p in out["systems"][0]["points"]]
    assert atts[0] > atts[-1]                       # the rates span low to overloaded
    assert out["max_abs_diff_pp"] == 0


def test_failures_are_misses():
    ok = {"ttft_s": 0.1, "tpot_s": 0.01, "num_tokens": 5, "error": None}
    failed = {"ttft_s": None, "tpot_s": None, "num_tokens": 0, "error": "timeout"}
    one_token = {"ttft_s": 0.1, "tpot_s": None, "num_tokens": 1, "error": None}
    m = measured_point([ok, failed, one_token, ok | {"tpot_s": 0.2}], SLO)
    assert m["attainment"] == 0.5 and m["ttft_attainment"] == 0.75 and m["tpot_attainment"] == 0.5


def test_reads_gzipped_results(tmp_path):
    import gzip
    import json

    from planner.fidelity import read_json
    (tmp_path / "a.json").write_text(json.dumps({"kind": "compare"}))
    with gzip.open(tmp_path / "a.json.gz", "wt") as f:
        json.dump({"kind": "compare"}, f)
    assert read_json(tmp_path / "a.json") == read_json(tmp_path / "a.json.gz") == {"kind": "compare"}
