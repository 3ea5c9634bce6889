"""TPOT with and without speculative decoding, per workload, at batch 1 and batch 8, in-process
on one pinned core, through the served decode path (a `Speculator`: the n-gram drafter sized
by AdaptiveK, exactly what a decode instance runs with decode.speculative = "ngram").

    python -m benchmarks.spec_decode_engine [--core 0] [--max-k 4] [--max-tokens 96]
        [--rounds 2] [--out docs/spec_decode]

For each workload (chatbot, code, summarization: client/bench/workloads.py, the served model's
tokenizer, raw prompts, ignore_eos) one engine (the default model and deployment settings:
bf16, the decode instance's weight format) generates greedily for the same requests with no
speculation and with it, taking turns per round (ABBA). Batch 1: each of the eight requests
alone, one after another; batch 8: the eight started together. A request's TPOT = (its last token's time - its first token's
time) / (its tokens - 1); its prefill is untimed. Reported: the median TPOT both ways and their
ratio, the acceptance rate (accepted / proposed draft tokens), tokens per verify row, and the
decoding sequences' tokens per step (what the router divides a step's time by), and whether the
greedy outputs are the same both ways (in float32 they are; in bfloat16 a verify row and a plain
decode step can round a logit differently, which flips exact bf16 ties: the share of tokens
before the first difference is reported). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from backends.core.model_runner import pin_threads

WORKLOADS = ("chatbot", "code", "summarization")
BATCHES = (1, 8)


def run_batch(engine, prompts: list[list[int]], params, speculator) -> dict:
    """Generate for `prompts` together: TPOT per request, tokens, and the speculator's counts."""
    from backends.core.spec_policy import Speculator
    first, last, tokens = {}, {}, {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    steps = 0
    while engine.has_unfinished():
        drafts = speculator.drafts(engine.scheduler.running) if speculator else None
        started = time.perf_counter()
        outs = engine.step(drafts=drafts)
        now = time.perf_counter()
        if speculator is not None and engine.last_batch is not None:
            speculator.observe(engine.last_batch, outs, now - started)
        steps += 1
        for o in outs:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
            first.setdefault(o.req_id, now)
            last[o.req_id] = now
    tpots = [(last[r] - first[r]) / (len(t) - 1) for r, t in tokens.items() if len(t) > 1]
    counts = speculator.stats() if isinstance(speculator, Speculator) else {}
    return {"tpots": tpots, "tokens": {r: t for r, t in sorted(tokens.items())}, "spec": counts}


def measure(engine, groups: list[list[list[int]]], params, make_speculator, rounds: int) -> dict:
    """ABBA rounds of none / ngram; each group of prompts runs together (batch 1: one prompt a
    group). Medians over every request's TPOT; the speculator's counts summed over the last
    round's groups."""
    runs = {"none": [], "ngram": []}
    outputs: dict[str, dict[str, list[int]]] = {"none": {}, "ngram": {}}
    run_batch(engine, groups[0], params, None)                        # warm-up (kernels)
    for r in range(rounds):
        counts: list[dict] = []
        for mode in (("none", "ngram") if r % 2 == 0 else ("ngram", "none")):
            for g, prompts in enumerate(groups):
                res = run_batch(engine, prompts, params, make_speculator() if mode == "ngram" else None)
                runs[mode] += res["tpots"]
                outputs[mode].update({f"{g}/{req}": t for req, t in res["tokens"].items()})
                if res["spec"]:
                    counts.append(res["spec"])
    spec = {k: sum(c[k] for c in counts) for k in ("spec_proposed", "spec_accepted",
                                                   "spec_emitted", "spec_verify_rows")}
    none, ngram = statistics.median(runs["none"]), statistics.median(runs["ngram"])
    proposed = spec["spec_proposed"]
    return {"tpot_none_s": none, "tpot_ngram_s": ngram, "speedup": none / ngram,
            "acceptance": spec["spec_accepted"] / proposed if proposed else 0.0,
            "tokens_per_verify_row": (spec["spec_emitted"] / spec["spec_verify_rows"]
                                      if spec["spec_verify_rows"] else None),
            "tokens_per_step": statistics.fmean(c["tokens_per_step"] for c in counts) if counts else None,
            "verify_rows": spec["spec_verify_rows"],
            "identical_output": outputs["none"] == outputs["ngram"],
            "common_prefix": common_prefix(outputs["none"], outputs["ngram"]),
            "samples": len(runs["none"])}


def common_prefix(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Mean share of each request's tokens before its two outputs first differ (1.0: same)."""
    shares = []
    for req, x in a.items():
        y = b.get(req, [])
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        shares.append(n / max(len(x), 1))
    return sum(shares) / len(shares) if shares else 1.0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    m = results["meta"]
    lines = [
        "# Speculative decoding (n-gram drafter, adaptive k): TPOT per workload, batch 1 and 8", "",
        f"Command: `{m['command']}`; {m['machine']}, one pinned core (core {m['core']}), load "
        f"average {m['load_before']} before, {m['load_after']} after. Default model and decode "
        f"settings (bf16, the decode weight format), greedy, ignore_eos, up to {m['max_tokens']} "
        f"output tokens, max k {m['max_k']}; {m['rounds']} ABBA rounds, medians over requests.", "",
        "| workload | batch | TPOT none (ms) | TPOT n-gram (ms) | speedup | acceptance | "
        "tokens / verify row | tokens / step | same output (share before the first difference) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        w, b = key.split("/")
        tvr = f"{r['tokens_per_verify_row']:.2f}" if r["tokens_per_verify_row"] else "-"
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        lines.append(f"| {w} | {b} | {r['tpot_none_s'] * 1e3:.1f} | {r['tpot_ngram_s'] * 1e3:.1f} "
                     f"| {r['speedup']:.2f}x | {r['acceptance']:.1%} | {tvr} | {tps} "
                     f"| {'yes' if r['identical_output'] else 'no'} ({r['common_prefix']:.0%}) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the project's default model)")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-prompt", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="activation dtype (default: the deployment's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/spec_decode"),
                    help="results prefix (.json, .md); docs/spec_decode for the record")
    args = ap.parse_args()
    pin_threads([args.core])                        # before the first torch op
    import dataclasses

    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.sampling import SamplingParams
    from backends.core.spec_policy import make_speculator
    from client.bench.workloads import LengthCaps, WorkloadSpec, load_workload
    from deploy.deployment import default_deployment

    dep = default_deployment(args.model) if args.model else default_deployment()
    path = str(dep.resolved_model_path())
    limits = dep.decode.limits(dep.block_size)       # the decode instance's, room for batch 8
    need = max(BATCHES) * -(-(args.max_prompt + args.max_tokens + args.max_k + 1) // dep.block_size)
    limits = dataclasses.replace(limits, num_kv_blocks=max(limits.num_kv_blocks, need),
                                 chunked_prefill=False,
                                 max_num_batched_tokens=max(limits.max_num_batched_tokens, args.max_prompt))
    engine = LLMEngine.from_path(path, EngineConfig(
        dtype=args.dtype or dep.dtype, kv_dtype=dep.kv_dtype, limits=limits, max_model_len=dep.max_model_len,
        role="both", weights=dep.weights,            # "both": it prefills too (untimed)
        prefix_caching=False))                       # every run prefills its prompts afresh
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = {"runs": {}}
    for name in args.workloads:
        spec = WorkloadSpec(name, max(BATCHES), seed=0,
                            caps=LengthCaps(max_prompt_tokens=args.max_prompt,
                                            max_output_tokens=args.max_tokens))
        requests = load_workload(spec, path).requests
        for batch in BATCHES:
            prompts = [list(r.prompt_ids) for r in requests]
            groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
            r = measure(engine, groups, params, lambda: make_speculator("ngram", args.max_k), args.rounds)
            results["runs"][f"{name}/{batch}"] = r
            print(f"{name:14s} batch {batch}: TPOT none {r['tpot_none_s'] * 1e3:6.1f} ms  ngram "
                  f"{r['tpot_ngram_s'] * 1e3:6.1f} ms  {r['speedup']:.2f}x  acceptance "
                  f"{r['acceptance']:.1%}  same output {r['identical_output']} "
                  f"({r['common_prefix']:.0%} before the first difference)", flush=True)
    results["meta"] = {"command": "python -m benchmarks.spec_decode_engine " + " ".join(sys.argv[1:]),
                       "machine": f"{os.cpu_count()} cores", "core": args.core,
                       "load_before": load_before,
                       "load_after": [round(x, 2) for x in os.getloadavg()],
                       "max_tokens": args.max_tokens, "max_k": args.max_k, "rounds": args.rounds}
    write(results, args.out)
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
