"""Simulated goodput of pure split, adaptive, adaptive-shared, colocated and chunked on this machine's profile, for
the settings of docs/goodput (no servers).

    python -m planner.mode_compare docs/goodput/raw/compare-*.json.gz \\
        --profile docs/profile_cpu.json --out docs/adaptive_sim

Each `client.bench compare` result gives a setting: its workload and caps, its SLOs and the
deployment each system was served with (1 prefill + 1 decode core; 2 colocated instances; the
same with chunked prefill). The lengths are a 2,000-request pool of that workload with those
caps (load_workload, seed 0), not the 40 requests measured. Each setting is judged twice:
- "as run": the SLOs in seconds the run used (multiples of the single-request latency of the
  engine of the day, mostly slower than the engine profiled now, so looser);
- "rescaled": the same multiples of this profile's single-request latency at the workload's p90
  prompt (TTFT: the prompt's prefill; TPOT: its decode steps over the median output), what the
  benchmark would set today (runs with absolute SLOs have no multiples and are judged once).
Systems: split (the disaggregated deployment), adaptive (the same instances, every request
routed by backends.core.router.route: planner/sim_routing.py), adaptive-shared (adaptive plus a
decode instance on the prefill core, time-sliced with prefill: SimConfig.shared), colocated and
chunked-512 (the run's baselines; where the run served none, the deployments `client.bench
compare` serves). Beside each: the goodput the run measured, where it served that system
(the "as run" row only: those are its SLOs). Goodput: the planner's rate search (planner.rate_search.goodput) over
seeded Poisson probes, each with one request lifetime of warm-up and at least 4 lifetimes,
30 s and 300 requests counted; one search per seed (--seeds) to show the sampling noise.
At each adaptive goodput the run is repeated once to record where the router sent requests.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deploy.deployment import Deployment
from planner.deployment import Target, deployment_configs, load_target
from planner.fidelity import read_json
from planner.rate_search import SLO, cycle, goodput, lifetime, make_probe
from planner.simulator import SimConfig, simulate

SYSTEMS = ("split", "adaptive", "adaptive-shared", "colocated", "chunked-512")
CHOICES = ("split", "colocated", "adaptive", "adaptive-shared")   # the planner's modes, simpler first
POOL = 2000
NOTES = "<!-- notes: kept when the command rewrites the table above -->"


def pool_lengths(workload: dict[str, Any], n: int = POOL) -> list[tuple[int, int]]:
    from client.bench.workloads import LengthCaps, WorkloadSpec, load_workload
    spec = WorkloadSpec(workload["name"], n, workload.get("seed", 0), LengthCaps(**workload["caps"]))
    return [(r.prompt_len, r.output_len) for r in load_workload(spec).requests]


def single_request(target: Target, lengths: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """This profile's TTFT and TPOT of one request alone at the pool's p90 prompt and median output."""
    lat = target.table.get(target.model, target.device, 1)
    p90 = int(np.percentile([p for p, _ in lengths], 90))
    out = max(2, int(np.median([o for _, o in lengths])))
    return lat.prefill_time([p90]), float(np.mean([lat.decode_time(1, p90 + k) for k in range(1, out)]))


def configs(compare: dict[str, Any], target: Target, slo: SLO,
            prefill_budget: int | None = None) -> dict[str, SimConfig]:
    """Each system simulated on its deployment as run; a system the run did not serve on the
    2-core deployments `client.bench compare` would have used. `prefill_budget`: every prefill
    batch (split's prefill instances, colocated's prompt batches) up to this many tokens
    instead of the deployments' own L_m."""
    from deploy.deployment import colocated_deployment
    def batch(dep: Deployment) -> Deployment:
        if prefill_budget is None:
            return dep
        return replace(dep, **{ph: replace(spec, max_num_batched_tokens=prefill_budget)
                               for ph in ("prefill", "colocated")
                               if (spec := getattr(dep, ph)) is not None and not spec.chunked_prefill})
    deps = {s["system"]["name"]: Deployment.from_dict(s["system"]["deployment"], check_host=False)
            for s in compare["systems"]}
    ours = batch(next(deps[n] for n in ("disaggregated", "adaptive", "adaptive-shared") if n in deps))
    split = replace(deployment_configs(ours, target)["disaggregated"].split(), num_shared_decode=0)
    model, cores = ours.model_path, len(set().union(*(ph.all_devices() for ph in ours.phases().values())))
    colocated = batch(deps.get("colocated") or colocated_deployment(model, cores))
    chunked = deps.get("chunked-512") or colocated_deployment(model, cores, chunked_prefill=True,
                                                              token_budget=512)
    return {"split": split, "adaptive": split.adaptive(slo),
            "adaptive-shared": split.shared().adaptive(slo),
            "colocated": deployment_configs(colocated, target)["colocated"],
            "chunked-512": deployment_configs(chunked, target)["colocated"]}


def measured(compare: dict[str, Any]) -> dict[str, float]:
    """The run's own goodput per system, under this module's names."""
    names = {"disaggregated": "split"}
    return {names.get(s["system"]["name"], s["system"]["name"]): s["goodput_rps"]
            for s in compare["systems"] if s.get("goodput_rps") is not None}


def search(config: SimConfig, lengths, slo: SLO, seed: int) -> float:
    life = lifetime(lengths, slo, config.mode)
    probe = make_probe(config, lengths, slo, seed, 300, max(30.0, 4 * life), 20000, life)
    return goodput(probe, slo.target, 1.0, 0.04)


def routes_at(config: SimConfig, lengths, slo: SLO, rate: float) -> dict[str, Any]:
    """Where the router sent the requests of one run at `rate` (seed 0), and how they fared."""
    life = lifetime(lengths, slo, config.mode)
    n = math.ceil(rate * life) + max(300, math.ceil(rate * max(30.0, 4 * life)))
    res = simulate(config, cycle(lengths, n), rate, 0, window=(life, math.inf))
    steps = sum(v["steps"] for k, v in res.stats.items() if k.startswith("decode"))
    out: dict[str, Any] = {"rate": rate, "attainment": res.attainment(slo.ttft, slo.tpot), **res.routes(),
                           "decode_steps": steps,
                           "skipped_decode_rows": res.stats["router"]["skipped_decode_rows"]}
    for kind in ("split", "local"):
        recs = [r for r in res.measured if r.route == kind]
        if recs:
            out[f"{kind}_mean_prompt"] = float(np.mean([r.req.prompt_len for r in recs]))
            out[f"{kind}_ttft_met"] = sum(r.ttft <= slo.ttft for r in recs) / len(recs)
            out[f"{kind}_tpot_met"] = sum(r.tpot <= slo.tpot for r in recs) / len(recs)
    return out


def setting(name: str, compare: dict[str, Any], target: Target, lengths, slo: SLO,
            seeds: Sequence[int], prefill_budget: int | None = None) -> dict[str, Any]:
    cfgs = configs(compare, target, slo, prefill_budget)
    found = {s: [search(c, lengths, slo, seed) for seed in seeds] for s, c in cfgs.items()}
    mean = {s: float(np.mean(g)) for s, g in found.items()}
    chosen = max(CHOICES, key=lambda s: mean[s])                                 # ties: simpler
    print(f"{name}: " + ", ".join(f"{s} {'/'.join(f'{g:.3g}' for g in v)}" for s, v in found.items())
          + f" -> {chosen}", flush=True)
    return {"name": name, "slo": asdict(slo), "goodput": found, "mean": mean, "chosen": chosen,
            "measured": measured(compare),
            "adaptive_routes": routes_at(cfgs["adaptive"], lengths, slo, mean["adaptive"])
            if mean["adaptive"] > 0 else None}


def run(path: Path, target: Target, seeds: Sequence[int], rescale: bool = True, as_run: bool = True,
        prefill_budget: int | None = None) -> list[dict[str, Any]]:
    compare = read_json(path)
    name = path.name.split(".")[0].removeprefix("compare-")
    lengths = pool_lengths(compare["workload"])
    s = compare["slo"]
    relative = s.get("mode") == "relative"
    out = [{**setting(f"{name} (as run)", compare, target, lengths, SLO(s["ttft_s"], s["tpot_s"]), seeds,
                      prefill_budget),
            "workload": compare["workload"], "slo_source": "as run"}] if as_run or not relative else []
    if relative and rescale:
        ttft1, tpot1 = single_request(target, lengths)
        slo = SLO(s["ttft_multiple"] * ttft1, s["tpot_multiple"] * tpot1)
        out.append({**setting(f"{name} (rescaled)", compare, target, lengths, slo, seeds, prefill_budget),
                    "measured": {}, "workload": compare["workload"],
                    "slo_source": f"{s['ttft_multiple']}x / {s['tpot_multiple']}x this profile's "
                                  f"single request ({ttft1:.3f} s / {tpot1 * 1e3:.1f} ms)"})
    return out


def markdown(results: Sequence[dict[str, Any]], command: str, png: str) -> str:
    lines = ["# Adaptive disaggregation in the simulator: split vs adaptive vs colocated", "",
             f"Command: `{command}` (planner/mode_compare.py says how).", "",
             "Goodput (req/s, 2 cores, >= 90% of requests within both SLOs), one search per seed "
             "(seed 0 / seed 1), then in brackets the goodput the run measured where it served "
             "that system; **bold**: the planner's choice among split, adaptive, adaptive-shared "
             "and colocated (the highest mean). Routes: where the router sent the requests at "
             "the adaptive goodput (share local, share held first for KV, mean prompt of each).", "",
             "| setting | SLO TTFT / TPOT | split | adaptive | adaptive-shared | colocated | chunked-512 "
             "| adaptive / split | best adaptive / best other | routes at adaptive goodput |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        g, m, real = r["goodput"], r["mean"], r.get("measured", {})

        def cell(s: str) -> str:
            text = " / ".join(f"{v:.3g}" for v in g[s]) if s in g else "-"
            text = f"**{text}**" if s == r["chosen"] else text
            return text + (f" [{real[s]:.3g}]" if s in real else "")
        others = max(m[s] for s in m if not s.startswith("adaptive"))
        best_adaptive = max(m[s] for s in m if s.startswith("adaptive"))
        ro = r["adaptive_routes"]
        routes = "-" if ro is None else (
            f"{100 * ro['local'] / max(1, ro['local'] + ro['split']):.0f}% local (prompt "
            f"{ro.get('local_mean_prompt', 0):.0f} vs {ro.get('split_mean_prompt', 0):.0f}), "
            f"{100 * ro['waited'] / max(1, ro['local'] + ro['split']):.0f}% held")
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"      # noqa: E731
        lines.append(f"| {r['name']} | {r['slo']['ttft']:.3g} s / {1e3 * r['slo']['tpot']:.3g} ms | "
                     f"{cell('split')} | {cell('adaptive')} | {cell('adaptive-shared')} | "
                     f"{cell('colocated')} | {cell('chunked-512')} | {ratio(m['adaptive'], m['split'])} | "
                     f"{ratio(best_adaptive, others)} | {routes} |")
    lines += ["", f"![goodput]({png})", ""]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(results)), 4.0))
    width = 0.8 / len(SYSTEMS)
    for i, s in enumerate(SYSTEMS):
        xs = [j + (i - (len(SYSTEMS) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [r["mean"].get(s, 0.0) for r in results], width, label=s)
    ax.set_xticks(range(len(results)))
    short = [r["name"].replace("chatbot-history-", "chatbot\n").replace("abs-slo-new-engine", "abs-slo")
             .replace(" (", "\n(") for r in results]
    ax.set_xticklabels(short, fontsize=7)
    ax.set_ylabel("simulated goodput (req/s, 2 cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.mode_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("compare", type=Path, nargs="+", help="`python -m client.bench compare` result JSONs")
    p.add_argument("--profile", type=Path, default=Path("docs/profile_cpu.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("docs/adaptive_sim"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-rescale", action="store_true",
                   help="judge relative-SLO runs only at the SLOs they ran with")
    g.add_argument("--rescaled-only", action="store_true",
                   help="judge relative-SLO runs only at their multiples of this profile's single request")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="simulate every prefill batch up to this many tokens (L_m) instead of the "
                        "runs' deployments' own")
    args = p.parse_args(argv)
    target = load_target(args.profile)
    results = [r for path in args.compare for r in run(path, target, args.seeds, not args.no_rescale,
                                                       not args.rescaled_only, args.prefill_budget)]
    command = "python -m planner.mode_compare " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(results, png)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "profile": str(args.profile), "settings": results}, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    notes = md.read_text().partition(NOTES)[2] if md.is_file() else ""
    md.write_text(markdown(results, command, png.name) + (NOTES + notes if notes else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
