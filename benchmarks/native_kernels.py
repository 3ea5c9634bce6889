"""Engine step time on torch ops vs our native CPU kernels (backends/core/csrc: decode
attention straight from the paged cache; fused SiLU-mul, add + RMSNorm and RoPE), interleaved
round by round on one pinned core: the real default model as its instances run it (bf16; the
decode weights for the decode batches of benchmarks/decode_attention.py, the prefill weights
for single prompts of 128, 512 and 2048 tokens).

    python -m benchmarks.native_kernels [--core 1] [--rounds 3]   # -> docs/bench_native_kernels.{json,md}
"""
from __future__ import annotations

import os

import torch

from benchmarks.decode_attention import ab_args, ab_doc, interleaved, write
from deploy.deployment import DEFAULT_MODEL_PATH, ROOT


def main(argv: list[str] | None = None) -> dict:
    args = ab_args("python -m benchmarks.native_kernels", __doc__, argv)
    from backends.core import attention as A
    from backends.core import model
    from backends.core import native
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.weights import load_checkpoint
    from planner.profile import EngineProbe
    if not native.available():
        raise SystemExit("native kernels not built: python -m backends.core.native --build")
    backend = A.backend_for("cpu")
    config, sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16, keep_quantized=True)
    engine = LLMEngine(config, sd, EngineConfig(dtype="bfloat16", weights="auto", role="decode",
                                                limits=EngineLimits(block_size=16, num_kv_blocks=2400)))
    probe = EngineProbe(engine, config.vocab_size)
    prefill_config, prefill_sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16)
    prefill = EngineProbe(LLMEngine(prefill_config, prefill_sd, EngineConfig(
        dtype="bfloat16", weights="auto", role="prefill",
        limits=EngineLimits(block_size=16, num_kv_blocks=256, max_num_batched_tokens=2048))), config.vocab_size)
    load_before = os.getloadavg()

    def use(on: bool):
        def switch() -> None:
            backend._native = model._FUSED = on
        return switch
    cases = interleaved(probe, {"torch": use(False), "native": use(True)}, args.rounds, args.steps,
                        prefills=(128, 512, 2048), prefill_probe=prefill)
    backend._native = model._FUSED = None
    doc = ab_doc("benchmarks.native_kernels", argv, args, load_before, cases)
    write(ROOT / "docs" / "bench_native_kernels", doc, [
        "# Engine step: torch ops vs our native CPU kernels", "",
        f"`{doc['command']}` ({doc['created']}), SmolLM2-135M as its instances run it (bf16 "
        f"activations; int4 + dense decode weights for decode, dense for prefill), one pinned core, one thread; median engine step "
        f"over {args.rounds} interleaved rounds x {args.steps} steps; load average {load_before[0]:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after. Decode contexts are per sequence at the first step; "
        f"a prefill step is one prompt to its first token.", ""],
        ("torch ops", "native kernels"), [])
    return doc


if __name__ == "__main__":
    main()
