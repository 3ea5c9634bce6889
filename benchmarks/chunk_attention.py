"""A prefill's time to its first token with prefill attention on our chunk kernel
(backends/core/csrc/chunk_attention.cpp) vs torch's SDPA, side by side in one engine on one pinned
core: the default model as a prefill instance runs it (bf16, weights auto, prefix caching on).

    python -m benchmarks.chunk_attention [--core 1] [--rounds 3]   # -> docs/chunk_attention.{json,md}

Cases: fresh prompts of 512 and 1,500 tokens, and 350 new tokens after 1,152 cached (a later
chat turn: its history was served a moment before). Each round runs both kernels in alternating
order (ABBA), each on prompts of its own (random token ids: a prompt seen before would hit the
cache); a case's figure is the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.decode_attention import ab_doc
from deploy.deployment import DEFAULT_MODEL_PATH, ROOT

CASES = (("512 new tokens", 0, 512), ("1,500 new tokens", 0, 1500), ("350 new tokens after 1,152 cached", 1152, 350))
NAMES = ("torch SDPA", "chunk kernel")


def build():
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.weights import load_checkpoint
    config, sd = load_checkpoint(DEFAULT_MODEL_PATH, torch.bfloat16, keep_quantized=True)
    return LLMEngine(config, sd, EngineConfig(dtype="bfloat16", weights="auto", role="prefill", prefix_caching=True,
                                              limits=EngineLimits(num_kv_blocks=2048, max_num_batched_tokens=4096)))


def first_token_s(engine, req_id: str, prompt: list[int]) -> float:
    from backends.core.sampling import SamplingParams
    engine.add_request(req_id, prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    started = time.perf_counter()
    while req_id in engine.seqs and not engine.seqs[req_id].output_ids:
        engine.step()
    took = time.perf_counter() - started
    if req_id in engine.seqs:
        engine.abort(req_id)
    return took


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chunk_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    args.steps = 1
    os.sched_setaffinity(0, {args.core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    from backends.core import attention as A
    from backends.core import native
    if not native.has("paged_chunk_attention"):
        raise SystemExit("the chunk attention kernel is not built here "
                         "(python -m backends.core.native --build; needs AVX-512 BF16)")
    engine, gen = build(), torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for rnd in range(args.rounds):
            for case, cached, new in CASES:
                for name in (NAMES if rnd % 2 == 0 else NAMES[::-1]):
                    A._TORCH._native_chunks = name == NAMES[1]
                    history = tokens(cached)
                    if cached:
                        first_token_s(engine, f"history-{rnd}-{name}", history)     # now cached
                    samples.setdefault(case, {}).setdefault(name, []).append(
                        first_token_s(engine, f"{case}-{rnd}-{name}", history + tokens(new)))
    finally:
        A._TORCH._native_chunks = None
    cases = {}
    for case, by in samples.items():
        a, b = (statistics.median(by[n]) * 1e3 for n in NAMES)
        cases[case] = {"sdpa_ms": a, "chunk_kernel_ms": b, "speedup": a / b}
    doc = ab_doc("benchmarks.chunk_attention", argv, args, load_before, cases)
    out = ROOT / "docs" / "chunk_attention"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    rows = [f"| {n} | {c['sdpa_ms']:.0f} | {c['chunk_kernel_ms']:.0f} | {c['speedup']:.2f}x |" for n, c in cases.items()]
    out.with_suffix(".md").write_text("\n".join([
        "# A prefill's time to first token: prefill attention on torch's SDPA vs our chunk kernel", "",
        f"Command: `{doc['command']}`; core {args.core}, load average {[round(x, 2) for x in load_before]} "
        f"before, {[round(x, 2) for x in os.getloadavg()]} after; {args.rounds} ABBA rounds, medians. "
        "Default model as a prefill instance (bf16, weights auto: dense prepacked layers for long rows, "
        "prefix caching on), random token ids.", "",
        f"| prompt | {NAMES[0]} (ms) | {NAMES[1]} (ms) | speedup |", "|---|---|---|---|", *rows, "",
        "Only attention differs: SDPA (flash for a fresh prompt; a masked call over the context gathered "
        "from the cache after a cached prefix) against the chunk kernel reading K/V from the paged cache "
        "(AVX-512 BF16 dot products, online softmax; docs/engine.md).", ""]))
    return doc


if __name__ == "__main__":
    main()
