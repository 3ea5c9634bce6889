"""Decode step time with the engine's decode attention as it was (one SDPA call at batch 1
whatever the context; every batch padded to its longest context) vs as it is (the per-KV-head
loop beyond SDPA_DECODE_MAX_CONTEXT tokens at batch 1; context-length groups), interleaved
round by round on one pinned core, the real default model.

    python -m benchmarks.decode_attention      # -> docs/bench_decode_attention.{json,md}
"""
from __future__ import annotations

import argparse
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

    def use(setting: tuple[int, int]) -> None:
        backend.sdpa_decode_max_context, backend.group_cost_tokens = setting
    cases = interleaved(probe, {"old": lambda: use(OLD), "new": lambda: use(new)}, rounds, steps)
    use(new)
    doc = {"command": "python -m benchmarks.decode_attention", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "core": core, "load_avg": [load_before, os.getloadavg()], "rounds": rounds,
           "steps_per_round": steps, "now": {"SDPA_DECODE_MAX_CONTEXT": new[0], "GROUP_COST_TOKENS": new[1]},
           "cases": cases}
    write(ROOT / "docs" / "bench_decode_attention", doc, [
        "# Decode attention, before and after the batch-1 / length-group change", "",
        f"`{doc['command']}` ({doc['created']}), SmolLM2-135M bf16, one pinned core, one thread; "
        f"median engine step over {rounds} interleaved rounds x {steps} steps; load average "
        f"{load_before[0]:.2f} at start. Contexts are per sequence at the first step.", ""],
        ("before", "now"), ["Only batch 1 beyond 256 tokens and batches split into more than one "
                            "length group run different code; the other rows run the same code both "
                            "ways, so their differences (a few %) are this machine's noise.", ""])
    return doc


def interleaved(probe: EngineProbe, variants: dict, rounds: int, steps: int,
                prefills: tuple[int, ...] = (), prefill_probe: EngineProbe | None = None,
                batches: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """Per case (the decode batches of `batches`, CASES by default, then one prompt of each of `prefills` on
    `prefill_probe`'s engine), the median step of two variants (label -> a function that switches to it), taking turns round by
    round (ABBA...); each case's `<label>_ms` and A/B `speedup`."""
    (a, set_a), (b, set_b) = variants.items()
    cases = {}
    runs = {name: (lambda c=ctxs: probe.decode(c, warmup=1, steps=steps)[0])
            for name, ctxs in (CASES if batches is None else batches).items()}
    runs |= {f"prefill 1 x {n}": (lambda n=n: [prefill_probe.prefill([n]) for _ in range(steps)]) for n in prefills}
    for name, run in runs.items():
        times: dict[str, list[float]] = {a: [], b: []}
        for rnd in range(rounds):
            order = [(a, set_a), (b, set_b)]
            for label, switch in order if rnd % 2 == 0 else order[::-1]:
                switch()
                times[label] += run()
        ta, tb = statistics.median(times[a]), statistics.median(times[b])
        cases[name] = {f"{a}_ms": 1e3 * ta, f"{b}_ms": 1e3 * tb, "speedup": ta / tb}
        print(f"{name:22s} {a} {1e3 * ta:7.1f} ms  {b} {1e3 * tb:7.1f} ms  x{ta / tb:.2f}", flush=True)
    return cases


def ab_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """An A/B benchmark's --core, --rounds, --steps, with this process pinned to that core on
    one thread."""
    p = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    return args


def ab_doc(module: str, argv: list[str] | None, args, load_before: tuple, cases: dict) -> dict:
    """An A/B benchmark's record: its command, when, the core, the load before and after, the
    rounds and steps (args.core, args.rounds, args.steps) and the cases."""
    command = f"python -m {module} " + " ".join(argv if argv is not None else [])
    return {"command": command.strip(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "core": args.core, "load_avg": [load_before, os.getloadavg()], "rounds": args.rounds,
            "steps_per_round": args.steps, "cases": cases}


def write(out: Path, doc: dict, intro: list[str], names: tuple[str, str], outro: list[str]) -> None:
    """`out`.json (the doc) and `out`.md: intro, the A/B table of doc["cases"], outro."""
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    keys = [k for k in next(iter(doc["cases"].values())) if k.endswith("_ms")]
    rows = [f"| {n} | {c[keys[0]]:.1f} | {c[keys[1]]:.1f} | {c['speedup']:.2f}x |" for n, c in doc["cases"].items()]
    out.with_suffix(".md").write_text("\n".join([
        *intro, f"| decode batch | {names[0]} (ms/step) | {names[1]} (ms/step) | speedup |",
        "|---|---|---|---|", *rows, "", *outro]))


if __name__ == "__main__":
    main()
