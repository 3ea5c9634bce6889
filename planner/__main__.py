"""The planner's commands.

    python -m planner profile [--model PATH] [--out docs/profile_cpu.json] [--quick]
    python -m planner plan --ttft S --tpot S [--profile PATH] [--workload NAME|FILE] [--devices NxM]
                           [--baseline-profile PATH | --no-baseline] [--out dep.json] [--json plan.json]
    python -m planner replan --trace TRACE --deployment DEP.json --ttft S --tpot S [--profile PATH]

`plan` defaults to the published A100 coefficients (OPT-13B, 4x8 GPUs); with a profile made by
`profile` it plans for that model on this machine's cores (devices default 1xCORES, the
colocated baseline from the same profile). It serves the best of pure split, adaptive (the
router per request, planner/modes.py) and colocated by goodput per device (--modes), and the
deployment it writes names that mode in its "mode" field. --workload: a client/bench workload name (chatbot,
chatbot-history, code, summarization: real lengths via load_workload), a JSON list of
[prompt_len, output_len], or a request trace (see planner/replan.py); default chatbot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from planner import profile as profiling
from planner.deployment import Target, best_of, load_target, make_planner, search
from planner.latency import load_profile
from planner.modes import choose, parse_modes, serve_modes
from planner.placement import plan_colocated
from planner.search import SLO, Placement, Planner, SearchSpace
from planner.sim_spec import Speculation

POOL_SIZE = 2000          # requests drawn from a named workload for the planner's length pool


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


def workload_lengths(name: str, n: int, seed: int = 0, max_prompt: int | None = None,
                     max_output: int | None = None) -> list[tuple[int, int]]:
    """Real lengths of a client/bench workload (SmolLM2 tokenizer), capped like the bench."""
    from client.bench.workloads import LengthCaps, WorkloadSpec, load_workload
    caps = LengthCaps(max_prompt_tokens=max_prompt, max_output_tokens=max_output)
    w = load_workload(WorkloadSpec(name, num_requests=n, seed=seed, caps=caps))
    return [(r.prompt_len, r.output_len) for r in w.requests]


def load_lengths(args: argparse.Namespace) -> tuple[list[tuple[int, int]], str]:
    from client.bench.workloads import WORKLOADS
    from planner.replan import load_trace
    if args.synthetic:
        p, o = args.synthetic
        return synthetic_lengths(POOL_SIZE, p, o, args.seed), f"synthetic means {p}/{o}"
    name = args.workload or "chatbot"
    caps = (args.max_prompt_tokens, args.max_output_tokens)
    if name in WORKLOADS:
        return workload_lengths(name, POOL_SIZE, args.seed, *caps), f"client/bench workload {name}"
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--workload: {name!r} is neither a workload ({', '.join(WORKLOADS)}) "
                         "nor a file")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, list) and all(isinstance(x, list) and len(x) == 2 for x in data):
            return [(int(p), int(o)) for p, o in data], f"file {name}"
    except json.JSONDecodeError:
        pass                                             # JSONL or CSV: a trace
    trace = load_trace(path)
    return trace.lengths, f"trace {name}"


def add_target_arguments(p: argparse.ArgumentParser, slo_required: bool = True) -> None:
    """The hardware, model, SLOs and simulation budget (plan and replan)."""
    p.add_argument("--profile", default=None,
                   help="latency coefficients (default: the published A100 file)")
    p.add_argument("--capacity", default=None,
                   help="KV capacity CSV (model,tp,pp,max_num_tokens); default: the A100 file, "
                        "or --kv-blocks x block size with our profiles")
    p.add_argument("--device", default=None, help="device kind (default: the profile's, else a100-80gb)")
    p.add_argument("--model", default=None, help="model key (default: the profile's, else opt-13b)")
    p.add_argument("--ttft", type=float, required=slo_required, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=slo_required, help="TPOT SLO, seconds")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--devices", default=None,
                   help="NODESxDEVICES_PER_NODE (default: 1xCORES with our profiles, else 4x8)")
    p.add_argument("--pps", default=None,
                   help="pipeline degrees to consider (default 1,2; 1 on CPU cores)")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="L_m, the prefill batch's tokens (default: where the profile's prefill "
                        "reaches 95%% of its best rate, LatencyModel.saturation_length)")
    p.add_argument("--kv-blocks", type=int, default=1024, help="KV blocks per instance (CPU plans)")
    p.add_argument("--kv-gib", type=float, default=None,
                   help="KV memory per instance in GiB (CPU plans, instead of --kv-blocks): as many "
                        "blocks of the profile's KV dtype as fit")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "bfloat16", "float32", "float16", "int8"),
                   help="KV cache dtype (default: the profile's; fp16 for the published files, "
                        "whose capacities then scale by the bytes per token)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="decode batch limit (default 32 with our profiles, as deploy; else 256)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--span", type=float, default=30.0, help="min seconds of arrivals per probe")
    p.add_argument("--max-requests", type=int, default=SearchSpace.max_requests,
                   help="most requests one probe simulates (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", type=parse_speculative, default=None, metavar="DRAFTER:K:ACCEPTANCE",
                   help="decode (and colocated) instances speculate: DRAFTER (ngram) drafts K tokens "
                        "a step, each accepted with the measured ACCEPTANCE (e.g. ngram:3:0.6)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from planner import replan
    ap = argparse.ArgumentParser(prog="python -m planner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="choose a placement by simulation")
    add_target_arguments(p)
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-profile", default=None,
                      help="colocated baseline coefficients (default: --profile when it is ours)")
    base.add_argument("--no-baseline", action="store_true", help="skip the colocated baseline")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", help="workload name, JSON list of [prompt_len, output_len], "
                                        "or a request trace (default: chatbot)")
    src.add_argument("--synthetic", nargs=2, type=float, metavar=("MEAN_PROMPT", "MEAN_OUTPUT"))
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cap a named workload's prompts")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap a named workload's outputs")
    p.add_argument("--algorithm", choices=("low", "high", "both"), default="both")
    p.add_argument("--modes", type=parse_modes, default=("split", "adaptive", "colocated"),
                   help="how the placements may be served: split, adaptive, adaptive-shared (a "
                        "decode instance on each prefill instance's cores too), colocated (comma-"
                        "separated; colocated needs the baseline; default: split, adaptive, colocated)")
    p.add_argument("--out", help="write a deploy.deployment.Deployment JSON (CPU hosts)")
    p.add_argument("--json", help="write the plan as JSON")
    prof = sub.add_parser("profile", help="profile our engine on one core, fit the latency model")
    profiling.add_arguments(prof)
    rp = sub.add_parser("replan", help="check a deployment against a recorded request trace")
    add_target_arguments(rp, slo_required=False)
    replan.add_arguments(rp)
    return ap.parse_args(argv)


def resolve_target(args: argparse.Namespace) -> Target:
    return load_target(args.profile, args.device, args.model, args.capacity, args.kv_blocks,
                       kv_dtype=args.kv_dtype, kv_gib=args.kv_gib)


def parse_speculative(text: str) -> tuple[str, Speculation]:
    """DRAFTER:K:ACCEPTANCE -> (drafter, Speculation(K, ACCEPTANCE))."""
    try:
        method, k, acceptance = text.split(":")
        if method != "ngram":
            raise ValueError(f"the planner simulates the n-gram drafter (its drafting takes no "
                             f"step time), not {method!r}")
        return method, Speculation(int(k), float(acceptance))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--speculative {text!r}: {e} (expected e.g. ngram:3:0.6)") from None


def prefill_budget(args: argparse.Namespace, target: Target) -> int:
    """--prefill-budget, else L_m of the profile's one-device prefill (2048 where it has none)."""
    if args.prefill_budget is not None:
        return args.prefill_budget
    try:
        return target.table.get(target.model, target.device, 1).saturation_length()
    except KeyError:
        return 2048


def build_planner(args: argparse.Namespace, target: Target, lengths) -> Planner:
    ours = target.measured_here
    pps = args.pps or ("1" if ours else "1,2")
    max_seqs = args.max_num_seqs or (32 if ours else 256)
    return make_planner(target, lengths, SLO(args.ttft, args.tpot, args.target), args.devices,
                        pps=tuple(int(x) for x in pps.split(",")),
                        prefill_budget=prefill_budget(args, target),
                        max_num_seqs=max_seqs, block_size=target.info.get("block_size", 16),
                        num_requests=args.requests, min_span_s=args.span,
                        max_requests=args.max_requests, seed=args.seed,
                        speculation=args.speculative[1] if getattr(args, "speculative", None) else None)


def describe(p: Placement | None) -> str:
    if p is None:
        return "none fits"
    parts = [f"prefill tp{p.prefill.tp} pp{p.prefill.pp} x{p.num_prefill}"]
    if p.decode is not None:
        parts.append(f"decode tp{p.decode.tp} pp{p.decode.pp} x{p.num_decode}")
    units = f" per unit, {p.num_units} unit(s)" if p.algorithm == "low" else ""
    served = f", served {p.label}" if p.decode is not None else ""
    return (f"{p.algorithm:9s} {', '.join(parts)}{units}{served}: {p.goodput:.3g} req/s on "
            f"{p.num_devices} devices = {p.per_device:.3g} req/s/device")


def run_plan(args: argparse.Namespace) -> dict:
    target = resolve_target(args)
    lengths, source = load_lengths(args)
    planner = build_planner(args, target, lengths)
    t0 = time.perf_counter()
    plans = search(planner, args.algorithm)
    search_s = time.perf_counter() - t0
    best = best_of(plans)
    modes = _modes(planner, plans, args.modes)
    doc = {"workload": source, "model": target.model, "device": target.device,
           "devices": f"{planner.cluster.num_nodes}x{planner.cluster.gpus_per_node}",
           "slo": asdict(planner.slo),
           "mean_prompt": float(np.mean([p for p, _ in lengths])),
           "mean_output": float(np.mean([o for _, o in lengths])), "search_s": search_s,
           "num_sims": planner.num_sims, "plans": {k: _plan_dict(v) for k, v in plans.items()},
           "chosen": _plan_dict(best)}
    print(f"{target.model} on {doc['devices']} {target.device}; SLO TTFT {args.ttft:g} s, "
          f"TPOT {args.tpot:g} s, {100 * args.target:.0f}% attainment")
    print(f"workload: {source}; mean prompt {doc['mean_prompt']:.0f}, output {doc['mean_output']:.0f}")
    for p in plans.values():
        print(describe(p))
    print(f"search: {search_s:.1f} s, {planner.num_sims} simulations")
    baseline = args.baseline_profile or (args.profile if target.measured_here else None)
    if baseline and not args.no_baseline:
        doc["colocated"] = _baseline(planner, load_profile(baseline, target.device), best)
        if "colocated" in args.modes and doc["colocated"]["plan"]:
            modes.append(doc["colocated"].pop("_placement"))
    doc.get("colocated", {}).pop("_placement", None)
    for p in modes:
        print(f"  {p.label:15s} ({p.algorithm}): {p.goodput:.3g} req/s = {p.per_device:.3g} req/s/device")
    best = choose(modes) or best
    doc["modes"] = [_plan_dict(p) for p in modes]
    doc["chosen"], doc["mode"] = _plan_dict(best), best.mode if best else None
    doc["served_as"] = best.label if best else None
    print(f"chosen: {describe(best).strip()}" if best else "chosen: none fits")
    gain = (doc.get("colocated") or {}).get("gain_per_device")
    if gain is not None and gain < 1 and "colocated" not in args.modes:
        print(f"note: on these devices the colocated baseline is predicted {1 / gain:.2f}x this "
              f"plan's goodput per device (`python -m deploy serve --baseline colocated` serves it)")
    return doc | {"_best": best, "_target": target}


def _modes(planner: Planner, plans: dict[str, Placement | None], modes: tuple[str, ...]) -> list[Placement]:
    """Each disaggregated placement served as split and adaptive (those of `modes`; split
    alone: the placements as searched)."""
    wanted = [m for m in modes if m != "colocated"]
    found = [p for p in plans.values() if p is not None]
    if wanted == ["split"]:
        return found
    return [served for p in found for served in (serve_modes(planner, p, wanted) if wanted else [])]


def _baseline(planner: Planner, table, best: Placement | None) -> dict:
    colo = plan_colocated(planner, table)
    print(describe(colo))
    gain = best.per_device / colo.per_device if best and colo and colo.per_device else None
    if gain:
        print(f"goodput per device, disaggregated / colocated: {gain:.2f}x")
    return {"plan": _plan_dict(colo), "gain_per_device": gain, "_placement": colo}


def _plan_dict(p: Placement | None) -> dict | None:
    return None if p is None else {**asdict(p), "per_device": p.per_device, "served_as": p.label}


def deployment_for(best: Placement, target: Target, args: argparse.Namespace):
    """The Deployment that serves `best` (our profile's model file, dtype and block size)."""
    from deploy.deployment import DEFAULT_MODEL_PATH
    from planner.deployment import to_deployment
    info = target.info
    kv_dtype = target.kv_dtype if target.measured_here else "auto"
    return to_deployment(best, info.get("model_path", DEFAULT_MODEL_PATH),
                         target.kv_blocks or args.kv_blocks, args.max_num_seqs or 32,
                         prefill_budget(args, target), info.get("dtype", "bfloat16"),
                         info.get("block_size", 16), kv_dtype, SLO(args.ttft, args.tpot, args.target),
                         speculative=(args.speculative[0], args.speculative[1].k) if args.speculative else None)


def cmd_plan(args: argparse.Namespace) -> int:
    doc = run_plan(args)
    best, target = doc.pop("_best"), doc.pop("_target")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.out:
        if best is None:
            print("no placement to write", file=sys.stderr)
            return 1
        from planner.deployment import describe_cores, save_deployment
        dep = deployment_for(best, target, args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_deployment(dep, best.mode, args.out)
        print(f"cores: {describe_cores(dep)}")
        print(f"wrote {args.out}, mode {best.label} (serve it: python -m deploy serve --deployment "
              f"{args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cmd == "profile":
        return profiling.main(args, argv)
    if args.cmd == "replan":
        from planner.replan import cmd_replan
        target = resolve_target(args)
        return cmd_replan(args, target, lambda lengths: build_planner(args, target, lengths))
    return cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())
