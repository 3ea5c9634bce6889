"""Simulator fidelity: simulated vs measured SLO attainment on this machine.

    python -m planner.fidelity results/compare-chatbot-history.json [more compare results] \\
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


def simulate_records(config: SimConfig, results: Sequence[dict[str, Any]]) -> list[Any]:
    """The simulator's records for the measured requests, in the measured order."""
    requests = [Request(i, float(r["arrival_s"]), int(r["prompt_len"]), int(r["output_len"]))
                for i, r in enumerate(results)]
    return sorted(Simulator(config, requests).run().records, key=lambda rec: rec.req.req_id)


def simulated_point(records: Sequence[Any], slo: dict[str, float],
                    ttft_offset_s: float = 0.0) -> dict[str, float]:
    flags = [_meets(rec.ttft + ttft_offset_s, rec.tpot if rec.req.output_len > 1 else None, slo)
             for rec in records]
    return _summary(flags, [rec.ttft + ttft_offset_s for rec in records])


def serving_overhead(records: Sequence[Any], results: Sequence[dict[str, Any]]) -> float:
    """Median measured - simulated TTFT: what the serving path adds to a request's first token
    beyond the engine's steps (front end, Triton's hops, the client's socket), and what the
    instances lose to the shared machine."""
    gaps = [r["ttft_s"] - rec.ttft for r, rec in zip(results, records) if r.get("ttft_s") is not None]
    return float(np.median(gaps)) if gaps else 0.0


def _summary(flags: Sequence[tuple[bool, bool]], ttfts: Sequence[float]) -> dict[str, float]:
    n = len(flags)
    return {"attainment": sum(a and b for a, b in flags) / n,
            "ttft_attainment": sum(a for a, _ in flags) / n,
            "tpot_attainment": sum(b for _, b in flags) / n,
            "mean_ttft_s": float(np.mean(ttfts)) if ttfts else float("nan")}


def run(compare: dict[str, Any], target: Target, calibrate: bool = True) -> dict[str, Any]:
    """Simulated vs measured attainment at every measured rate of the disaggregated and the
    colocated systems. With `calibrate`, simulated TTFTs get the serving overhead measured at
    the lowest rate (`serving_overhead`); both the raw and the calibrated figures are kept."""
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
        measured = sorted(doc["points"], key=lambda p: p["rate"])
        records = [simulate_records(config, p["results"]) for p in measured]
        # calibrated at the lowest rate (the least loaded), applied at every rate
        offset = serving_overhead(records[0], measured[0]["results"]) if calibrate else 0.0
        points = []
        for p, recs in zip(measured, records):
            m = measured_point(p["results"], slo)
            raw = simulated_point(recs, slo)
            cal = simulated_point(recs, slo, offset)
            points.append({"rate": p["rate"], "measured": m, "simulated_raw": raw,
                           "simulated": cal, "diff_pp": 100 * (cal["attainment"] - m["attainment"]),
                           "raw_diff_pp": 100 * (raw["attainment"] - m["attainment"])})
        out["systems"].append({"name": name, "label": doc["label"], "ttft_offset_s": offset,
                               "points": points})
    for key, field in (("max_abs_diff_pp", "diff_pp"), ("max_abs_raw_diff_pp", "raw_diff_pp")):
        diffs = [abs(p[field]) for s in out["systems"] for p in s["points"]]
        out[key] = max(diffs) if diffs else None
    return out


def markdown(results: Sequence[dict[str, Any]], command: str, plot_name: str) -> str:
    lines = ["# Simulator fidelity: simulated vs measured SLO attainment", "",
             f"Command: `{command}`.", "",
             "For each measured rate of each run, the simulator replays that rate's requests at "
             "their measured arrival times on the deployment's configuration, with the latency "
             "model profiled on this machine (`docs/profile_cpu.json`), and judges them by the "
             "run's SLOs. Target: within 2 percentage points.", ""]
    for result in results:
        slo = result["slo"]
        lines += [f"## {result['name']}", "",
                  f"Measured by `{result['source_command']}`: {result['workload']['name']}, "
                  f"{result['workload']['num_requests']} requests per rate; SLOs TTFT <= "
                  f"{slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.0f} ms.", ""]
        for s in result["systems"]:
            lines += [f"**{s['label']}** (serving overhead added to simulated TTFTs: "
                      f"{1e3 * s['ttft_offset_s']:.0f} ms, measured at the lowest rate)", "",
                      "| rate (rps) | measured | simulated | diff (pp) | raw simulated (diff) "
                      "| TTFT met meas/sim | TPOT met meas/sim | mean TTFT meas/sim (s) |",
                      "|---|---|---|---|---|---|---|---|"]
            for p in s["points"]:
                m, q, r = p["measured"], p["simulated"], p["simulated_raw"]
                lines.append(f"| {p['rate']:.3g} | {100 * m['attainment']:.1f}% | "
                             f"{100 * q['attainment']:.1f}% | {p['diff_pp']:+.1f} | "
                             f"{100 * r['attainment']:.1f}% ({p['raw_diff_pp']:+.1f}) | "
                             f"{100 * m['ttft_attainment']:.0f}% / {100 * q['ttft_attainment']:.0f}% | "
                             f"{100 * m['tpot_attainment']:.0f}% / {100 * q['tpot_attainment']:.0f}% | "
                             f"{m['mean_ttft_s']:.2f} / {q['mean_ttft_s']:.2f} |")
            lines.append("")
        worst = result["max_abs_diff_pp"]
        if worst is not None:
            lines += [f"Largest difference: {worst:.1f} pp calibrated, "
                      f"{result['max_abs_raw_diff_pp']:.1f} pp raw (target 2 pp: "
                      f"{'met' if worst <= 2 else '**not met**'}).", ""]
    lines += [f"![attainment]({plot_name})", ""]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        for s, color in zip(result["systems"], ("C0", "C1", "C2")):
            rates = [p["rate"] for p in s["points"]]
            ax.plot(rates, [100 * p["measured"]["attainment"] for p in s["points"]], "o-",
                    color=color, label=f"{s['name']} measured")
            ax.plot(rates, [100 * p["simulated"]["attainment"] for p in s["points"]], "x--",
                    color=color, label=f"{s['name']} simulated")
        ax.axhline(90, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("rate (requests/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_title(result["name"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_json(path: Path) -> Any:
    """A JSON file, gzipped (`.gz`) or not."""
    if path.suffix == ".gz":
        import gzip
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("compare", type=Path, nargs="+", help="`python -m client.bench compare` result JSONs")
    p.add_argument("--profile", type=Path, default=Path("docs/profile_cpu.json"))
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="no serving overhead on simulated TTFTs")
    p.add_argument("--out", type=Path, default=Path("docs/planner_fidelity"),
                   help="output prefix (default: docs/planner_fidelity)")
    args = p.parse_args(argv)
    target = load_target(args.profile)
    results = []
    for path in args.compare:
        compare = read_json(path)
        if compare.get("kind") != "compare":
            raise SystemExit(f"error: {path} is not a `client.bench compare` result")
        results.append({"name": path.name.split(".")[0].removeprefix("compare-"),
                        **run(compare, target, args.calibrate)})
    command = "python -m planner.fidelity " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(results, png)
    diffs = [r["max_abs_diff_pp"] for r in results if r["max_abs_diff_pp"] is not None]
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "max_abs_diff_pp": max(diffs, default=None), "runs": results}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results, command, png.name))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
