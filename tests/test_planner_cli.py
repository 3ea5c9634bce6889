"""Planner end to end on a toy profile: both algorithms, the baseline, and the Deployment JSON."""
from __future__ import annotations

import json
import os

import pytest

from planner.deployment import load_deployment
from planner.__main__ import main
from planner.latency import LatencyModel, LatencyTable, load_profile


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
    dep, mode = load_deployment(tmp_path / "dep.json", check_host=False)
    assert mode == plan["mode"] == chosen["mode"] and mode in ("split", "adaptive")
    assert json.loads((tmp_path / "dep.json").read_text())["mode"] == mode
    units = chosen["num_units"] if chosen["algorithm"] == "low" else 1
    assert dep.prefill.num_instances == chosen["num_prefill"] * units
    assert dep.decode.num_instances == chosen["num_decode"] * units
    assert not dep.prefill.all_devices() & dep.decode.all_devices()


def write_cpu_profile(path, model="toy-cpu"):
    """A profile in the format `python -m planner profile` writes (our engine on CPU cores)."""
    lat = LatencyModel(model, "cpu-core", 1, (0.01, 5e-4, 1e-7), (0.02, 1e-6, 1e-3), (0.02, 1e-6, 1e-3))
    doc = json.loads(LatencyTable([lat]).to_json())
    doc["profile"] = {"model": model, "device": "cpu-core", "tp": 1, "dtype": "bfloat16",
                      "block_size": 16, "model_path": "models/toy.gguf", "kv_bytes_per_token": 23040,
                      "kv_link": {"bandwidth_Bps": 4e9, "latency_s": 5e-5}}
    path.write_text(json.dumps(doc))
    return path


FAST = ["--requests", "100", "--span", "10", "--max-requests", "300"]


def test_plan_for_this_machine_with_a_cpu_profile(tmp_path, capsys):
    profile = write_cpu_profile(tmp_path / "cpu.json")
    (tmp_path / "w.json").write_text(json.dumps([[50 + 7 * i % 100, 5 + i % 15] for i in range(200)]))
    rc = main(["plan", "--profile", str(profile), "--workload", str(tmp_path / "w.json"),
               "--ttft", "0.5", "--tpot", "0.1", "--devices", "1x2", *FAST,
               "--out", str(tmp_path / "dep.json"), "--json", str(tmp_path / "plan.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "toy-cpu on 1x2 cpu-core" in out and "colocated" in out      # baseline from the same profile
    assert "cores: prefill [0]; decode [1]" in out and "chosen:" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["chosen"]["prefill"]["pp"] == 1 and plan["chosen"]["goodput"] > 0   # no pp on cores
    assert plan["colocated"]["plan"]["num_prefill"] == 2
    dep, mode = load_deployment(tmp_path / "dep.json", check_host=(os.cpu_count() or 1) >= 2)
    assert mode == plan["mode"]
    assert dep.prefill.devices == ((0,),) and dep.decode.devices == ((1,),)
    assert dep.model_path == "models/toy.gguf" and dep.dtype == "bfloat16" and dep.block_size == 16
    # the prefill batch stops at the profile's L_m unless --prefill-budget says otherwise
    lm = load_profile(profile).get("toy-cpu", "cpu-core", 1).saturation_length()
    assert dep.prefill.max_num_batched_tokens == lm and 16 <= lm < 2048
    assert dep.decode.max_num_batched_tokens == 2048          # decode's steps: not L_m
    assert main(["plan", "--profile", str(profile), "--workload", str(tmp_path / "w.json"), "--ttft",
                 "0.5", "--tpot", "0.1", "--devices", "1x2", *FAST, "--prefill-budget", "512",
                 "--out", str(tmp_path / "dep512.json")]) == 0
    assert load_deployment(tmp_path / "dep512.json", check_host=False)[0].prefill.max_num_batched_tokens == 512


def test_plan_takes_a_named_workload_or_a_trace(tmp_path, monkeypatch, capsys):
    import planner.__main__ as cli
    calls = []

    def fake(name, n, seed=0, max_prompt=None, max_output=None):
        calls.append((name, max_prompt, max_output))
        return [(40 + i % 60, 4 + i % 10) for i in range(n)]
    monkeypatch.setattr(cli, "workload_lengths", fake)
    profile = str(write_cpu_profile(tmp_path / "cpu.json"))
    args = ["--profile", profile, "--ttft", "0.5", "--tpot", "0.1", "--devices", "1x2",
            "--algorithm", "high", "--no-baseline", *FAST]
    assert main(["plan", "--workload", "code", "--max-output-tokens", "64", *args]) == 0
    assert calls == [("code", None, 64)]
    assert "client/bench workload code" in capsys.readouterr().out
    (tmp_path / "t.csv").write_text("arrival_s,prompt_len,output_len\n0,30,5\n0.5,60,8\n1.0,90,3\n")
    assert main(["plan", "--workload", str(tmp_path / "t.csv"), *args]) == 0
    assert "mean prompt 60, output 5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a workload"):
        main(["plan", "--workload", "no-such-thing", *args])


# ---- KV dtype: bytes per token and capacity follow it ------------------------------------------

def test_published_capacities_scale_with_the_kv_dtype():
    from planner.deployment import load_target
    from planner.latency import KV_BYTES_PER_TOKEN
    fp16, int8 = load_target(), load_target(kv_dtype="int8")
    assert fp16.kv_dtype == "float16" and fp16.kv_bytes_per_token == KV_BYTES_PER_TOKEN["opt-13b"]
    assert int8.kv_bytes_per_token == 2 * 40 * 40 * (128 + 2)          # int8 values + bf16 scales
    ratio = fp16.kv_bytes_per_token / int8.kv_bytes_per_token           # 1.969 for head_dim 128
    for key, tokens in fp16.capacity.items():
        assert int8.capacity[key] == int(tokens * ratio)


def test_cpu_profile_kv_budget_in_gib_follows_the_profiled_kv_dtype(tmp_path):
    from planner.deployment import deployment_configs, load_target
    bf16 = write_cpu_profile(tmp_path / "bf16.json")
    doc = json.loads(bf16.read_text())
    doc["profile"].update(kv_dtype="int8", kv_bytes_per_token=30 * 2 * 3 * (64 + 2))   # SmolLM2
    (tmp_path / "int8.json").write_text(json.dumps(doc))
    blocks = {name: load_target(tmp_path / f"{name}.json", kv_gib=1.0).kv_blocks for name in ("bf16", "int8")}
    assert blocks == {"bf16": (1 << 30) // (23040 * 16), "int8": (1 << 30) // (11880 * 16)}   # 2912, 5649
    assert blocks["int8"] / blocks["bf16"] == pytest.approx(1.94, abs=0.01)
    with pytest.raises(ValueError, match="profiled with bfloat16 KV, not int8"):
        load_target(bf16, kv_dtype="int8")
    from deploy.deployment import default_deployment
    dep = default_deployment("m.gguf", 2)
    with pytest.raises(ValueError, match="holds bfloat16 KV, the profile measured int8"):
        deployment_configs(dep, load_target(tmp_path / "int8.json"))


def test_plan_writes_the_profiles_kv_dtype_and_blocks(tmp_path):
    doc = json.loads(write_cpu_profile(tmp_path / "cpu.json").read_text())
    doc["profile"].update(kv_dtype="int8", kv_bytes_per_token=11880)
    (tmp_path / "int8.json").write_text(json.dumps(doc))
    (tmp_path / "w.json").write_text(json.dumps([[50 + 7 * i % 100, 5 + i % 15] for i in range(200)]))
    rc = main(["plan", "--profile", str(tmp_path / "int8.json"), "--workload", str(tmp_path / "w.json"),
               "--ttft", "0.5", "--tpot", "0.1", "--devices", "1x2", "--kv-gib", "0.5",
               "--no-baseline", *FAST, "--out", str(tmp_path / "dep.json")])
    assert rc == 0
    dep, _ = load_deployment(tmp_path / "dep.json", check_host=False)
    assert dep.kv_dtype == "int8" and dep.decode.num_kv_blocks == (1 << 29) // (11880 * 16)
