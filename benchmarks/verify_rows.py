"""What a verify row costs on this host, and the batch-1 speedup that cost allows speculation.

    python -m benchmarks.verify_rows [--core 1] [--rounds 3] [--out docs/spec_verify_rows]

The default model as a decode instance runs it (bf16, weights auto, our kernels where built),
one sequence at a context of ~300 tokens, steps carrying k = 0..8 draft tokens (k + 1 rows),
interleaved round by round on one pinned core; each k's figure is the median of its steps.

A step that verifies k drafts yields 1 + p + ... + p^k tokens where each draft token is accepted
with probability p (the model AdaptiveK plans with, backends/core/spec_policy.py), and costs
c(k) / c(0) plain steps. The best batch-1 TPOT speedup at acceptance p is therefore
max_k (1 + p + ... + p^k) / (c(k) / c(0)), and the report gives it for p from 0.5 to 0.95, and
the least p at which it reaches 1.5x; and, for a drafter that wastes no row, the speedup at a
accepted tokens a step. Drafting is taken as free (the n-gram drafter's lookup is
microseconds). The first figure holds for acceptance independent from token to token; a real
drafter's comes in runs, so the second is the bound: given the tokens a drafter gets accepted
per step, no lossless verification on this host's kernels is faster than that.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.quant_linear import build, step_times

DRAFTS = (0, 1, 2, 3, 4, 6, 8)
ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TARGET = 1.5


def best_speedup(cost: dict[int, float], p: float) -> tuple[float, int]:
    """(max over k of expected tokens per step / relative step cost, the k that reaches it)."""
    return max((sum(p ** j for j in range(k + 1)) / (cost[k] / cost[0]), k) for k in cost)


def no_waste_speedup(cost: dict[int, float], accepted: int) -> float:
    """The speedup of a drafter that proposes exactly the `accepted` tokens the target accepts
    (no rejected row): 1 + accepted tokens per step at the cost of accepted + 1 rows."""
    return (1 + accepted) / (cost[accepted] / cost[0])


def least_acceptance(cost: dict[int, float], target: float = TARGET) -> float | None:
    """The least p (to 0.01) whose best speedup reaches `target`; None if none below 1 does."""
    for p in (i / 100 for i in range(1, 100)):
        if best_speedup(cost, p)[0] >= target:
            return p
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.verify_rows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("docs/spec_verify_rows"))
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    from backends.core import native
    engine = build(native.has("quant_linear"))
    load_before = os.getloadavg()
    samples: dict[int, list[float]] = {k: [] for k in DRAFTS}
    for rnd in range(args.rounds):
        for k in (DRAFTS if rnd % 2 == 0 else reversed(DRAFTS)):
            samples[k].extend(step_times(engine, 1, k, args.steps, f"r{rnd}-{k}"))
    cost = {k: statistics.median(v) for k, v in samples.items()}
    bounds = {p: best_speedup(cost, p) for p in ACCEPTANCE}
    flags = native.cpu_flags()
    doc = {"command": "python -m benchmarks.verify_rows " + " ".join(argv if argv is not None else []),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "core": args.core,
           "isa": sorted(f for f in flags if f.startswith(("avx", "amx"))),
           "native_kernels": engine.runner.model.lm_head.native,
           "load_avg": [load_before, os.getloadavg()], "rounds": args.rounds, "steps_per_round": args.steps,
           "step_ms": {k: c * 1e3 for k, c in cost.items()},
           "row_cost": {k: (cost[k] - cost[0]) / k / cost[0] for k in DRAFTS if k},
           "best_speedup": {p: {"speedup": s, "k": k} for p, (s, k) in bounds.items()},
           "least_acceptance_for_target": least_acceptance(cost), "target": TARGET,
           "no_waste_speedup": {a: no_waste_speedup(cost, a) for a in DRAFTS if a}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    la = doc["least_acceptance_for_target"]
    args.out.with_suffix(".md").write_text("\n".join([
        "# What a verify row costs, and the batch-1 speedup it allows", "",
        f"Command: `{doc['command'].strip()}`; core {args.core}, ISA {', '.join(doc['isa']) or 'unknown'}, "
        f"native kernels {'on' if doc['native_kernels'] else 'off'}; load average "
        f"{[round(x, 2) for x in load_before]} before, {[round(x, 2) for x in os.getloadavg()]} after; "
        f"{args.rounds} interleaved rounds x {args.steps} steps, medians. Default model, bf16, weights auto, "
        "one sequence at a context of ~300 tokens.", "",
        "| draft tokens k (rows k + 1) | step (ms) | step / plain step | each extra row / plain step |",
        "|---|---|---|---|",
        *(f"| {k} | {cost[k] * 1e3:.2f} | {cost[k] / cost[0]:.2f} | "
          + (f"{doc['row_cost'][k]:.2f} |" if k else " |") for k in DRAFTS), "",
        "Best batch-1 speedup lossless speculation can reach at per-token acceptance p (drafting "
        "free, the best k for this cost curve):", "",
        "| p | " + " | ".join(f"{p:.2f}" for p in ACCEPTANCE) + " |",
        "|---|" + "---|" * len(ACCEPTANCE),
        "| best speedup | " + " | ".join(f"{s:.2f}x (k={k})" for s, k in bounds.values()) + " |", "",
        f"A {TARGET}x batch-1 TPOT needs p >= {la:.2f} here." if la is not None
        else f"No acceptance below 1 reaches {TARGET}x here.", "",
        "A drafter that wastes no row (it proposes exactly the a tokens the target then accepts): "
        "each step yields 1 + a tokens at the cost of a + 1 rows:", "",
        "| accepted a | " + " | ".join(str(a) for a in doc["no_waste_speedup"]) + " |",
        "|---|" + "---|" * len(doc["no_waste_speedup"]),
        "| speedup | " + " | ".join(f"{s:.2f}x" for s in doc["no_waste_speedup"].values()) + " |", ""]))
    return doc


if __name__ == "__main__":
    main()
