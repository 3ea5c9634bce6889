"""Planner end to end on a toy profile: both algorithms, the baseline, and the Deployment JSON."""
from __future__ import annotations

import json

from deploy.deployment import Deployment
from planner.__main__ import main
from planner.latency import LatencyModel, LatencyTable


def write_inputs(tmp_path):
    models = [LatencyModel("toy", "gpu-x", tp, (0.02 / tp, 1e-4 / tp, 1e-8), (0.01, 2e-6 / tp, 1e-4),
                           (0.01, 2e-6 / tp, 2e-4), decode_threshold=32) for tp in (1, 2)]
    LatencyTable(models).save(tmp_path / "p.json")
    rows = ["model,tp,pp,max_num_tokens"] + [f"toy,{tp},{pp},{20000 * tp * pp}"
                                             for tp in (1, 2) for pp in (1, 2)]
    (tmp_path / "cap.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "w.json").write_text(json.dumps([[100 + 7 * i % 300, 10 + i % 40] for i in range(200)]))


def test_plan_writes_a_deployment(tmp_path, capsys):
    write_inputs(tmp_path)
    rc = main(["plan", "--profile", str(tmp_path / "p.json"), "--capacity", str(tmp_path / "cap.csv"),
               "--device", "gpu-x", "--model", "toy", "--workload", str(tmp_path / "w.json"),
               "--ttft", "0.3", "--tpot", "0.05", "--devices", "2x4", "--pps", "1",
               "--requests", "100", "--span", "10", "--max-requests", "300",
               "--baseline-profile", str(tmp_path / "p.json"),
               "--out", str(tmp_path / "dep.json"), "--json", str(tmp_path / "plan.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "low" in out and "high" in out and "colocated" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    chosen = plan["chosen"]
    assert chosen["goodput"] > 0 and chosen["num_devices"] <= 8
    dep = Deployment.load(tmp_path / "dep.json", check_host=False)
    units = chosen["num_units"] if chosen["algorithm"] == "low" else 1
    assert dep.prefill.num_instances == chosen["num_prefill"] * units
    assert dep.decode.num_instances == chosen["num_decode"] * units
    assert not dep.prefill.all_devices() & dep.decode.all_devices()
