"""bf16 paged attention on the AMX tiles vs our AVX-512 kernels (backends/core/csrc/
paged_decode.cpp), one op call per case, interleaved round by round on one pinned core, the
default model's attention shape (3 KV heads x 3 query heads, head size 64, blocks of 16, a
strided 3-layer pool as the engine's): decode tokens (1 per sequence) and verify rows (3 and 5
tokens per sequence: speculative decoding with 2 and 4 drafts) at contexts of 32-2,000, batch 1
and 8. DISTSERVE_AMX_ATTENTION=0 selects the AVX-512 kernels.

    python -m benchmarks.amx_attention [--core 1] [--rounds 3] [--calls 30]
        # -> docs/bench_amx_attention.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.decode_attention import ab_doc
from deploy.deployment import ROOT

KVH, G, HD, BS = 3, 3, 64, 16
CASES = [(b, ctx, nq) for b, ctxs in ((1, (32, 128, 512, 1024, 2000)), (8, (256, 1000)))
         for ctx in ctxs for nq in (1, 3, 5)]


def op_call(batch: int, ctx: int, nq: int):
    """A closure running the op once on random bf16 data in a strided pool, scattered blocks."""
    from backends.core.attention.metadata import AttentionMetadata
    g = torch.Generator().manual_seed(batch * 7919 + ctx)
    per = -(-ctx // BS)
    pool = torch.randn(batch * per + 3, 3, 2, KVH, BS, HD, generator=g).to(torch.bfloat16)
    perm = torch.randperm(batch * per + 3, generator=g).tolist()
    tables = [perm[i * per:(i + 1) * per] for i in range(batch)]
    k, v = pool[:, 1, 0], pool[:, 1, 1]
    meta = AttentionMetadata.build(0, [nq] * batch, [ctx] * batch, tables, BS)
    q = torch.randn(batch * nq, KVH * G, HD, generator=g).to(torch.bfloat16)
    if nq == 1:
        return lambda: torch.ops.distserve.paged_decode_attention(q, k, v, meta.block_tables, meta.seq_lens, HD ** -0.5)
    qlens = torch.full((batch,), nq, dtype=torch.int32)
    return lambda: torch.ops.distserve.paged_prefix_attention(q, k, v, meta.block_tables, meta.seq_lens, qlens,
                                                              HD ** -0.5)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.amx_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=30, help="op calls a round (their mean is one sample)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_amx_attention")
    args = p.parse_args(argv)
    args.steps = args.calls
    os.sched_setaffinity(0, {args.core % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    from backends.core import native
    if not native.available():
        raise SystemExit("native kernels not built: python -m backends.core.native --build")
    if not native.cpu_has("amx_bf16", "amx_tile"):
        raise SystemExit("this CPU has no AMX-BF16: nothing to compare")
    load_before = os.getloadavg()
    cases = {}
    for batch, ctx, nq in CASES:
        call = op_call(batch, ctx, nq)
        best = {"avx512": float("inf"), "amx": float("inf")}
        for rnd in range(args.rounds):
            order = [("amx", "1"), ("avx512", "0")]
            for label, env in order if rnd % 2 == 0 else order[::-1]:
                os.environ["DISTSERVE_AMX_ATTENTION"] = env
                call()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                best[label] = min(best[label], (time.perf_counter() - t0) / args.calls)
        name = f"B={batch} ctx {ctx}, {nq} token{'s' * (nq > 1)} a sequence"
        cases[name] = {"avx512_us": 1e6 * best["avx512"], "amx_us": 1e6 * best["amx"],
                       "speedup": best["avx512"] / best["amx"]}
        print(f"{name:34s} avx512 {1e6 * best['avx512']:8.1f} us  amx {1e6 * best['amx']:8.1f} us  "
              f"x{best['avx512'] / best['amx']:.2f}", flush=True)
    os.environ.pop("DISTSERVE_AMX_ATTENTION", None)
    doc = ab_doc("benchmarks.amx_attention", argv, args, load_before, cases)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    rows = [f"| {n} | {c['avx512_us']:.1f} | {c['amx_us']:.1f} | {c['speedup']:.2f}x |" for n, c in cases.items()]
    args.out.with_suffix(".md").write_text("\n".join([
        "# bf16 paged attention: AVX-512 kernels vs the AMX tiles, one layer's op call", "",
        f"Command: `{doc['command']}`; one pinned core (core {args.core}), load average "
        f"{[round(x, 2) for x in doc['load_avg'][0]]} before, {[round(x, 2) for x in doc['load_avg'][1]]} after; "
        f"the best of {args.rounds} interleaved rounds of {args.calls} calls. The default model's shape "
        "(3 KV heads x 3 query heads, head size 64, blocks of 16).", "",
        "| case | AVX-512 (us) | AMX (us) | speedup |", "|---|---|---|---|", *rows, ""]))
    return doc


if __name__ == "__main__":
    main()
