"""Simulator fidelity: simulated vs measured SLO attainment on this machine.

    python -m planner.fidelity results/compare-chatbot-history.json \\
        --profile docs/profile_cpu.json --out docs/planner_fidelity

Input: a `python -m client.bench compare` result (every request of every rate measured, with
its scheduled arrival and lengths, the SLOs, and each system's deployment). For every measured
rate of the disaggregated and the colocated systems, the simulator replays the very same
requests at the very same arrival times on a SimConfig built from that system's deployment
(instance counts, KV blocks, batch limits, block size, chunking) with the latency model fitted
on this machine (`./build.sh profile`), and computes the attainment under the same SLOs.
Measured failures count as misses, as in the benchmark.

Output: <out>.json, <out>.md (a table per system: rate, measured, simulated, difference in
percentage points, TTFT and TPOT attainment apart, mean TTFT both ways) and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from planner.latency import LatencyModel, Link, load_profile
from planner.simulator import InstanceSpec, Request, SimConfig, Simulator

# decode's KV fetch from the prefill pool is a memcpy (docs/bench_serving.md: 4-6 GB/s for
# 3-12 MB) after the descriptor's trip through the orchestrator (~3 ms hand-off)
SHM_LINK = Link(5e9, 3e-3)
SYSTEMS = ("disaggregated", "colocated")


def instance_spec(phase: dict[str, Any], latency: LatencyModel, block_size: int) -> InstanceSpec:
    return InstanceSpec(latency, num_kv_blocks=phase["num_kv_blocks"],
                        max_num_seqs=phase["max_num_seqs"],
                        max_num_batched_tokens=phase["max_num_batched_tokens"],
                        block_size=block_size, chunked_prefill=phase.get("chunked_prefill", False))


def sim_config(deployment: dict[str, Any], latency: LatencyModel, kv_bytes_per_token: float,
               link: Link = SHM_LINK) -> SimConfig:
    """The SimConfig of a deployment (deploy.Deployment.to_dict()) that serves one system."""
    bs = deployment["block_size"]
    if "colocated" in deployment["systems"]:
        col = deployment["colocated"]
        return SimConfig("colocated", prefill=instance_spec(col, latency, bs),
                         num_prefill=col["num_instances"])
    pre, dec = deployment["prefill"], deployment["decode"]
    return SimConfig("disaggregated", prefill=instance_spec(pre, latency, bs),
                     decode=instance_spec(dec, latency, bs), num_prefill=pre["num_instances"],
                     num_decode=dec["num_instances"], link=link,
                     kv_bytes_per_token=kv_bytes_per_token)


def _meets(ttft: float | None, tpot: float | None, slo: dict[str, float]) -> tuple[bool, bool]:
    ttft_ok = ttft is not None and ttft <= slo["ttft_s"]
    tpot_ok = tpot is None or tpot <= slo["tpot_s"]
    return ttft_ok, tpot_ok


def measured_point(results: Sequence[dict[str, Any]], slo: dict[str, float]) -> dict[str, float]:
    flags = [_meets(r["ttft_s"], r["tpot_s"], slo) if r.get("error") is None and r["num_tokens"]
             else (False, False) for r in results]
    ttfts = [r["ttft_s"] for r in results if r.get("ttft_s") is not None]
    return _summary(flags, ttfts)


def simulated_point(config: SimConfig, results: Sequence[dict[str, Any]],
                    slo: dict[str, float]) -> dict[str, float]:
    requests = [Request(i, float(r["arrival_s"]), int(r["prompt_len"]), int(r["output_len"]))
                for i, r in enumerate(results)]
    sim = Simulator(config, requests).run()
    flags = [_meets(rec.ttft, rec.tpot if rec.req.output_len > 1 else None, slo)
             for rec in sim.records]
    return _summary(flags, [rec.ttft for rec in sim.records])


def _summary(flags: Sequence[tuple[bool, bool]], ttfts: Sequence[float]) -> dict[str, float]:
    n = len(flags)
    return {"attainment": sum(a and b for a, b in flags) / n,
            "ttft_attainment": sum(a for a, _ in flags) / n,
            "tpot_attainment": sum(b for _, b in flags) / n,
            "mean_ttft_s": float(np.mean(ttfts)) if ttfts else float("nan")}


def pick_latency(table: Any, model: str | None) -> LatencyModel:
    """The profile's one tp=1 entry (or the one for `model`)."""
    entries = [m for m in table._models.values() if m.tp == 1 and (model is None or m.model == model)]
    if len(entries) != 1:
        have = sorted(k[0] for k in table._models)
        raise SystemExit(f"error: need exactly one tp=1 latency model in the profile"
                         f"{' for ' + model if model else ''}; have {have} (use --latency-model)")
    return entries[0]


def kv_bytes_per_token(deployment: dict[str, Any], model_config: dict[str, Any] | None) -> float:
    if not model_config:
        return 0.0
    elt = 2 if deployment.get("dtype", "bfloat16") in ("bfloat16", "float16") else 4
    return 2.0 * model_config["num_layers"] * model_config["num_kv_heads"] * model_config["head_dim"] * elt


def run(compare: dict[str, Any], latency: LatencyModel,
        model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    slo = compare["slo"]
    out = {"source_command": compare["command"], "workload": compare["workload"], "slo": slo,
           "latency_model": latency.to_dict(), "systems": []}
    for doc in compare["systems"]:
        name = doc["system"]["name"]
        if name not in SYSTEMS:
            continue
        deployment = doc["system"]["deployment"]
        config = sim_config(deployment, latency, kv_bytes_per_token(deployment, model_config))
        points = []
        for p in sorted(doc["points"], key=lambda p: p["rate"]):
            m = measured_point(p["results"], slo)
            s = simulated_point(config, p["results"], slo)
            points.append({"rate": p["rate"], "measured": m, "simulated": s,
                           "diff_pp": 100 * (s["attainment"] - m["attainment"])})
        out["systems"].append({"name": name, "label": doc["label"], "points": points})
    diffs = [abs(p["diff_pp"]) for s in out["systems"] for p in s["points"]]
    out["max_abs_diff_pp"] = max(diffs) if diffs else None
    return out


def markdown(result: dict[str, Any], command: str, plot: str) -> str:
    slo = result["slo"]
    lines = ["# Simulator fidelity: simulated vs measured SLO attainment", "",
             f"Command: `{command}`. Measurements: `{result['source_command']}`.", "",
             f"Workload {result['workload']['name']}, {result['workload']['num_requests']} requests "
             f"per rate; SLOs TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= "
             f"{slo['tpot_s'] * 1e3:.0f} ms. The simulator replays each measured rate's requests "
             f"at their measured arrival times on the deployment's configuration, with the "
             f"latency model fitted on this machine (`{result['latency_model']['model']}`, "
             f"`{result['latency_model']['device']}`). Target: within 2 percentage points.", ""]
    for s in result["systems"]:
        lines += [f"## {s['label']}", "",
                  "| rate (rps) | measured | simulated | diff (pp) | TTFT met meas/sim "
                  "| TPOT met meas/sim | mean TTFT meas/sim (s) |",
                  "|---|---|---|---|---|---|---|"]
        for p in s["points"]:
            m, q = p["measured"], p["simulated"]
            lines.append(f"| {p['rate']:.3g} | {100 * m['attainment']:.1f}% | "
                         f"{100 * q['attainment']:.1f}% | {p['diff_pp']:+.1f} | "
                         f"{100 * m['ttft_attainment']:.0f}% / {100 * q['ttft_attainment']:.0f}% | "
                         f"{100 * m['tpot_attainment']:.0f}% / {100 * q['tpot_attainment']:.0f}% | "
                         f"{m['mean_ttft_s']:.2f} / {q['mean_ttft_s']:.2f} |")
        lines.append("")
    worst = result["max_abs_diff_pp"]
    if worst is not None:
        lines.append(f"Largest difference: {worst:.1f} pp (target 2 pp: "
                     f"{'met' if worst <= 2 else '**not met**'}).")
    lines += ["", f"![attainment]({plot})", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for s, color in zip(result["systems"], ("C0", "C1", "C2")):
        rates = [p["rate"] for p in s["points"]]
        ax.plot(rates, [100 * p["measured"]["attainment"] for p in s["points"]], "o-",
                color=color, label=f"{s['name']} measured")
        ax.plot(rates, [100 * p["simulated"]["attainment"] for p in s["points"]], "x--",
                color=color, label=f"{s['name']} simulated")
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"Simulated vs measured: {result['workload']['name']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("compare", type=Path, help="a `python -m client.bench compare` result JSON")
    p.add_argument("--profile", type=Path, default=Path("docs/profile_cpu.json"))
    p.add_argument("--latency-model", help="model key in the profile (default: its only one)")
    p.add_argument("--out", type=Path, default=Path("docs/planner_fidelity"),
                   help="output prefix (default: docs/planner_fidelity)")
    args = p.parse_args(argv)
    compare = json.loads(args.compare.read_text())
    if compare.get("kind") != "compare":
        raise SystemExit(f"error: {args.compare} is not a `client.bench compare` result")
    latency = pick_latency(load_profile(args.profile), args.latency_model)
    model_config = _model_config(compare)
    result = run(compare, latency, model_config)
    command = "python -m planner.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(result, png)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result, command, png.name))
    print(args.out.with_suffix(".md").read_text())
    return 0


def _model_config(compare: dict[str, Any]) -> dict[str, Any] | None:
    """The served model's shape (for KV bytes per token), read from its file if present."""
    from backends.core.weights import load_checkpoint
    from deploy.deployment import ROOT
    path = Path(compare["systems"][0]["system"]["deployment"]["model_path"])
    path = path if path.is_absolute() else ROOT / path
    if not path.exists():
        print(f"warning: {path} not found: KV transfers take no time", file=sys.stderr)
        return None
    cfg, _ = load_checkpoint(path)
    return {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}


if __name__ == "__main__":
    raise SystemExit(main())
