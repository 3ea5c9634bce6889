"""Simulator fidelity: simulated vs measured SLO attainment on this machine.

    python -m planner.fidelity results/compare-chatbot-history.json \\
        --profile docs/profile_cpu.json --out docs/planner_fidelity

Input: a `python -m client.bench compare` result (every request of every rate measured, with
its scheduled arrival and lengths, the SLOs, and each system's deployment). For every measured
rate of the disaggregated and the colocated systems, the simulator replays the very same
requests at the very same arrival times on the SimConfig of that system's deployment
(planner.deployment.deployment_configs: instance counts, KV blocks, batch limits, block size,
chunking) with the latency model and KV copy bandwidth profiled on this machine
(`./build.sh profile`), and computes the attainment under the same SLOs.
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

from deploy.deployment import Deployment
from planner.deployment import Target, deployment_configs, load_target
from planner.simulator import Request, SimConfig, Simulator

SYSTEMS = ("disaggregated", "colocated")


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


def run(compare: dict[str, Any], target: Target) -> dict[str, Any]:
    slo = compare["slo"]
    out = {"source_command": compare["command"], "workload": compare["workload"], "slo": slo,
           "latency_model": {"model": target.model, "device": target.device,
                             "kv_bytes_per_token": target.kv_bytes_per_token,
                             "link": None if target.link is None else vars(target.link)},
           "systems": []}
    for doc in compare["systems"]:
        name = doc["system"]["name"]
        if name not in SYSTEMS:
            continue
        deployment = Deployment.from_dict(doc["system"]["deployment"], check_host=False)
        config = deployment_configs(deployment, target)[name]
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
    p.add_argument("--out", type=Path, default=Path("docs/planner_fidelity"),
                   help="output prefix (default: docs/planner_fidelity)")
    args = p.parse_args(argv)
    compare = json.loads(args.compare.read_text())
    if compare.get("kind") != "compare":
        raise SystemExit(f"error: {args.compare} is not a `client.bench compare` result")
    result = run(compare, load_target(args.profile))
    command = "python -m planner.fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(result, png)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result, command, png.name))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
