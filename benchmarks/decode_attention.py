"""Decode step time with the engine's decode attention as it was (one SDPA call at batch 1
whatever the context; every batch padded to its longest context) vs as it is (the per-KV-head
loop beyond SDPA_DECODE_MAX_CONTEXT tokens at batch 1; context-length groups), interleaved
round by round on one pinned core, the real default model.

    python -m benchmarks.decode_attention      # -> docs/bench_decode_attention.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from backends.core import attention as A
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.weights import load_checkpoint
from deploy.deployment import DEFAULT_MODEL_PATH, ROOT
from planner.profile import EngineProbe

OLD = (10 ** 9, 10 ** 12)            # (SDPA_DECODE_MAX_CONTEXT, GROUP_COST_TOKENS) before
MIXED = [18, 21, 24, 38, 44, 49, 97, 106, 141, 193, 275, 295, 318, 403, 413, 422, 442, 501, 546,
         562, 575, 636, 669, 692, 692, 752, 786, 787, 839, 870, 881, 886]
CASES = {"B=1 ctx 1024": [1024], "B=1 ctx 256": [256], "B=1 ctx 32": [32],
         "B=8 ctx 256 uniform": [256] * 8, "B=8 mixed 40-900": MIXED[::4],
         "B=32 mixed 18-886": MIXED, "B=32 ctx 512 uniform": [512] * 32}


def main(core: int = 1, rounds: int = 3, steps: int = 5) -> dict:
    os.sched_setaffinity(0, {core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    backend = A.backend_for("cpu")
    new = (backend.sdpa_decode_max_context, backend.group_cost_tokens)
    config, sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16)
    probe = EngineProbe(LLMEngine(config, sd, EngineConfig(dtype="bfloat16",
                                                           limits=EngineLimits(block_size=16,
                                                                               num_kv_blocks=2400))), config.vocab_size)
    load_before = os.getloadavg()
    cases = {}
    for name, ctxs in CASES.items():
        times: dict[str, list[float]] = {"old": [], "new": []}
        for rnd in range(rounds):
            order = [("old", OLD), ("new", new)]
            for label, (max_ctx, group_cost) in order if rnd % 2 == 0 else order[::-1]:
                backend.sdpa_decode_max_context, backend.group_cost_tokens = max_ctx, group_cost
                times[label] += probe.decode(ctxs, warmup=1, steps=steps)[0]
        old, cur = statistics.median(times["old"]), statistics.median(times["new"])
        cases[name] = {"old_ms": 1e3 * old, "new_ms": 1e3 * cur, "speedup": old / cur}
        print(f"{name:22s} before {1e3 * old:7.1f} ms  now {1e3 * cur:7.1f} ms  x{old / cur:.2f}", flush=True)
    backend.sdpa_decode_max_context, backend.group_cost_tokens = new
    doc = {"command": "python -m benchmarks.decode_attention", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "core": core, "load_avg": [load_before, os.getloadavg()], "rounds": rounds,
           "steps_per_round": steps, "now": {"SDPA_DECODE_MAX_CONTEXT": new[0], "GROUP_COST_TOKENS": new[1]},
           "cases": cases}
    out = ROOT / "docs" / "bench_decode_attention"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    rows = [f"| {n} | {c['old_ms']:.1f} | {c['new_ms']:.1f} | {c['speedup']:.2f}x |" for n, c in cases.items()]
    out.with_suffix(".md").write_text("\n".join([
        "# Decode attention, before and after the batch-1 / length-group change", "",
        f"`{doc['command']}` ({doc['created']}), SmolLM2-135M bf16, one pinned core, one thread; "
        f"median engine step over {rounds} interleaved rounds x {steps} steps; load average "
        f"{load_before[0]:.2f} at start. Contexts are per sequence at the first step.", "",
        "| decode batch | before (ms/step) | now (ms/step) | speedup |", "|---|---|---|---|", *rows, "",
        "Only batch 1 beyond 256 tokens and batches split into more than one length group run "
        "different code; the other rows run the same code both ways, so their differences "
        "(a few %) are this machine's noise.", ""]))
    return doc


if __name__ == "__main__":
    main()
