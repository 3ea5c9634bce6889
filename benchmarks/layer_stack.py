"""Decode step time with the layer stack in one native call (backends/core/layer_stack.py) vs
the Python layer loop, interleaved round by round on one pinned core, the default model in the
decode instance's format (weights=auto, role=decode: GGUF int4 codes on our kernel, and the dense weight past 16 rows).

    python -m benchmarks.layer_stack [--core 1] [--rounds 3] [--steps 5]
        # -> docs/bench_layer_stack.{json,md}

Batches of more than 16 rows run the loop both ways (the int4 kernel hands them to the dense
weight), so their rows show this machine's noise.
"""
from __future__ import annotations

import os

import torch

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.weights import load_checkpoint
from benchmarks.decode_attention import ab_args, ab_doc, interleaved, write
from deploy.deployment import DEFAULT_MODEL_PATH, ROOT
from planner.profile import EngineProbe


def main(argv: list[str] | None = None) -> dict:
    args = ab_args("python -m benchmarks.layer_stack", __doc__, argv)
    config, sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16, keep_quantized=True)
    engine = LLMEngine(config, sd, EngineConfig(weights="auto", role="decode", limits=EngineLimits(block_size=16, num_kv_blocks=2400)))
    model = engine.runner.model
    stack = model._layer_stack()
    if stack is None:
        raise SystemExit("the layer stack does not apply here (needs the native kernels with quant_linear)")
    probe = EngineProbe(engine, config.vocab_size)
    load_before = os.getloadavg()

    def use(on: bool) -> None:
        model._stack = stack if on else None
    cases = interleaved(probe, {"loop": lambda: use(False), "stack": lambda: use(True)}, args.rounds, args.steps)
    use(True)
    doc = ab_doc("benchmarks.layer_stack", argv, args, load_before, cases)
    write(ROOT / "docs" / "bench_layer_stack", doc, [
        "# A decode step's layers in one native call vs the Python layer loop", "",
        f"`{doc['command']}` ({doc['created']}), SmolLM2-135M Q4_1 as a decode instance runs it (weights=auto), one pinned core "
        f"(core {args.core}), one thread; median engine step over {args.rounds} interleaved rounds x "
        f"{args.steps} steps; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after. "
        "Contexts are per sequence at the first step.", ""],
        ("Python loop", "one call"),
        ["Batches of more than 16 sequences run the Python loop both ways (past 16 rows the int4 "
         "kernel hands a layer to its dense weight), so those rows show the noise.", ""])
    return doc


if __name__ == "__main__":
    main()
