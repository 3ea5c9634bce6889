"""python -m planner plan --profile PATH --model opt-13b (--workload lengths.json | --synthetic
| --chatbot) --ttft 0.25 --tpot 0.1 --devices 4x8 [--baseline-profile PATH] [--out dep.json]"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from planner.latency import KV_BYTES_PER_TOKEN, anchor_path, load_kv_capacity, load_profile, model_key
from planner.placement import plan_colocated, plan_high, plan_low
from planner.search import SLO, Cluster, Placement, Planner, SearchSpace


def synthetic_lengths(n: int, mean_prompt: float, mean_output: float, seed: int = 0,
                      max_total: int = 2048) -> list[tuple[int, int]]:
    """Log-normal-ish lengths with the given means (sigma 1), clipped to the paper's filter."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = int(rng.lognormal(np.log(mean_prompt) - 0.5, 1.0))
        o = int(rng.lognormal(np.log(mean_output) - 0.5, 1.0))
        if 4 <= p <= 1024 and o >= 4 and p + o <= max_total:
            out.append((p, o))
    return out


def chatbot_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Real ShareGPT lengths through client/bench/workloads.py (SmolLM2 tokenizer)."""
    from client.bench.workloads import WorkloadSpec, load_workload
    w = load_workload(WorkloadSpec("chatbot", num_requests=n, seed=seed))
    return [(r.prompt_len, r.output_len) for r in w.requests]


def load_lengths(args: argparse.Namespace) -> tuple[list[tuple[int, int]], str]:
    if args.workload:
        data = json.loads(Path(args.workload).read_text())
        return [(int(p), int(o)) for p, o in data], f"file {args.workload}"
    if args.synthetic:
        p, o = args.synthetic
        return synthetic_lengths(2000, p, o, args.seed), f"synthetic means {p}/{o}"
    return chatbot_lengths(2000, args.seed), "ShareGPT (client/bench chatbot workload)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m planner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="choose a placement by simulation")
    p.add_argument("--profile", default=str(anchor_path("distserve-a100-profile.distserve.json")))
    p.add_argument("--baseline-profile", default=None,
                   help="colocated baseline coefficients (e.g. the vLLM A100 file)")
    p.add_argument("--capacity", default=str(anchor_path("distserve-a100-max-num-tokens.csv")))
    p.add_argument("--device", default="a100-80gb")
    p.add_argument("--model", default="opt-13b")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", help="JSON list of [prompt_len, output_len]")
    src.add_argument("--synthetic", nargs=2, type=float, metavar=("MEAN_PROMPT", "MEAN_OUTPUT"))
    p.add_argument("--ttft", type=float, required=True)
    p.add_argument("--tpot", type=float, required=True)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--devices", default="4x8", help="NODESxDEVICES_PER_NODE")
    p.add_argument("--pps", default="1,2", help="pipeline degrees to consider")
    p.add_argument("--prefill-budget", type=int, default=2048, help="L_m")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--span", type=float, default=30.0, help="min seconds of arrivals per probe")
    p.add_argument("--max-requests", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algorithm", choices=("low", "high", "both"), default="both")
    p.add_argument("--out", help="write a deploy.deployment.Deployment JSON (CPU hosts)")
    p.add_argument("--json", help="write the plan as JSON")
    return ap.parse_args(argv)


def describe(p: Placement | None) -> str:
    if p is None:
        return "none fits"
    parts = [f"prefill tp{p.prefill.tp} pp{p.prefill.pp} x{p.num_prefill}"]
    if p.decode is not None:
        parts.append(f"decode tp{p.decode.tp} pp{p.decode.pp} x{p.num_decode}")
    units = f" per unit, {p.num_units} unit(s)" if p.algorithm == "low" else ""
    return (f"{p.algorithm:9s} {', '.join(parts)}{units}: {p.goodput:.2f} req/s on "
            f"{p.num_devices} devices = {p.per_device:.3f} req/s/device")


def run_plan(args: argparse.Namespace) -> dict:
    lengths, source = load_lengths(args)
    table = load_profile(args.profile, args.device)
    space = SearchSpace(model_key(args.model), table, load_kv_capacity(args.capacity),
                        pps=tuple(int(x) for x in args.pps.split(",")),
                        prefill_budget=args.prefill_budget,
                        kv_bytes_per_token=KV_BYTES_PER_TOKEN.get(model_key(args.model), 0.0),
                        num_requests=args.requests, min_span_s=args.span,
                        max_requests=args.max_requests, seed=args.seed)
    planner = Planner(space, lengths, SLO(args.ttft, args.tpot, args.target),
                      Cluster.parse(args.devices, args.device))
    t0 = time.perf_counter()
    plans = {}
    if args.algorithm in ("low", "both"):
        plans["low"] = plan_low(planner)
    if args.algorithm in ("high", "both"):
        plans["high"] = plan_high(planner)
    search_s = time.perf_counter() - t0
    best = max((p for p in plans.values() if p), key=lambda p: p.per_device, default=None)
    doc = {"workload": source, "mean_prompt": float(np.mean([p for p, _ in lengths])),
           "mean_output": float(np.mean([o for _, o in lengths])), "search_s": search_s,
           "num_sims": planner.num_sims, "plans": {k: _plan_dict(v) for k, v in plans.items()},
           "chosen": _plan_dict(best)}
    print(f"workload: {source}; mean prompt {doc['mean_prompt']:.0f}, output {doc['mean_output']:.0f}")
    for p in plans.values():
        print(describe(p))
    print(f"search: {search_s:.1f} s, {planner.num_sims} simulations")
    if args.baseline_profile:
        doc["colocated"] = _baseline(args, planner, best)
    return doc | {"_best": best}


def _baseline(args: argparse.Namespace, planner: Planner, best: Placement | None) -> dict:
    colo = plan_colocated(planner, load_profile(args.baseline_profile, args.device))
    print(describe(colo))
    gain = best.per_device / colo.per_device if best and colo and colo.per_device else None
    if gain:
        print(f"goodput per device, disaggregated / colocated: {gain:.2f}x")
    return {"plan": _plan_dict(colo), "gain_per_device": gain}


def _plan_dict(p: Placement | None) -> dict | None:
    return None if p is None else {**asdict(p), "per_device": p.per_device}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run_plan(args)
    best = doc.pop("_best")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.out:
        if best is None:
            print("no placement to write", file=sys.stderr)
            return 1
        from planner.deployment import to_deployment
        to_deployment(best).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
