"""Decode-step time with the quantized layers on torch's int4 kernel vs ours
(backends/core/csrc/quant_linear.cpp), interleaved round by round on one pinned core: the real
default model as a decode instance runs it (bf16, weights auto), plain steps at batch 1-16 and
batch-1 verify steps carrying k draft tokens (k + 1 rows), each at a context of ~300 tokens.

    python -m benchmarks.quant_linear [--core 1] [--rounds 3]   # -> docs/bench_quant_linear.{json,md}

Two engines are built, one per kernel (the choice is made when a layer is built); each case's
figure is the median over its steps in all rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch

from benchmarks.decode_attention import ab_doc, write
from deploy.deployment import DEFAULT_MODEL_PATH, ROOT

CASES = ((1, 0), (1, 2), (1, 4), (4, 0), (8, 0), (16, 0))      # (batch, draft tokens)


def build(native: bool):
    from backends.core import quant
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.weights import load_checkpoint
    config, sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16, keep_quantized=True)
    enabled = quant.native_int4_enabled
    with mock.patch.object(quant, "native_int4_enabled", lambda dtype: native and enabled(dtype)):
        engine = LLMEngine(config, sd, EngineConfig(dtype="bfloat16", weights="auto", role="both",
                                                    limits=EngineLimits(num_kv_blocks=1024)))
    assert engine.runner.model.lm_head.native == native
    return engine


def step_times(engine, batch: int, k: int, steps: int, tag: str) -> list[float]:
    from backends.core.sampling import SamplingParams
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, r in enumerate(ids):
        engine.add_request(r, list(range(100 + i, 400)),
                           SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    while any(not engine.seqs[r].output_ids for r in ids):          # prefilled
        engine.step()
    times = []
    for _ in range(steps):
        drafts = {r: [33] * k for r in ids} if k else None
        t0 = time.perf_counter()
        engine.step(drafts=drafts)
        times.append(time.perf_counter() - t0)
    for r in ids:
        engine.abort(r)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    from backends.core import native
    if not native.has("quant_linear"):
        raise SystemExit("the native quant_linear kernel is not built here "
                         "(python -m backends.core.native --build; needs AVX-512 VNNI or AVX2)")
    engines = {"torch int4": build(False), "native": build(True)}
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {}
    for rnd in range(args.rounds):
        for batch, k in CASES:
            case = f"{batch}" + (f", verifying {k} draft tokens ({k + 1} rows)" if k else "")
            for name, engine in (engines.items() if rnd % 2 == 0 else reversed(engines.items())):
                samples.setdefault(case, {}).setdefault(name, []).extend(
                    step_times(engine, batch, k, args.steps, f"{name}-{rnd}-{batch}-{k}"))
    cases = {}
    for case, by in samples.items():
        a, b = (statistics.median(by[n]) * 1e3 for n in engines)
        cases[case] = {"torch_int4_ms": a, "native_ms": b, "speedup": a / b}
    doc = ab_doc("benchmarks.quant_linear", argv, args, load_before, cases)
    write(ROOT / "docs" / "bench_quant_linear", doc, [
        "# Decode steps: quantized layers on torch's int4 kernel vs ours", "",
        f"Command: `{doc['command']}`; core {args.core}, load average {[round(x, 2) for x in load_before]} "
        f"before, {[round(x, 2) for x in os.getloadavg()]} after; {args.rounds} interleaved rounds x "
        f"{args.steps} steps, medians. Default model, bf16, weights auto (GGUF Q4_1 layers, the tied "
        "Q8_0 head), context ~300 tokens. Past 4 rows (torch int4) or 16 (native) the engines run the prepacked dense weights.", ""],
        ("torch int4", "native"), [
        "torch's kernel dequantizes every weight again for each row of the step; ours unpacks it once "
        "for all of them, and runs the Q8_0 head as one 8-bit plane instead of two int4 planes."])
    return doc


if __name__ == "__main__":
    main()
