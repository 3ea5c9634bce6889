"""TPOT with and without speculative decoding, per workload, at batch 1 and batch 8, in-process
on one pinned core, through the served decode path (a `Speculator`: the n-gram drafter sized
by AdaptiveK, exactly what a decode instance runs with decode.speculative = "ngram").

    python -m benchmarks.spec_decode_engine [--core 0] [--max-k 4] [--max-tokens 96]
        [--rounds 2] [--own-history-too] [--remote-drafter [--draft-core 1]] [--out docs/spec_decode]

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
before the first difference is reported). With --remote-drafter a third system runs beside
the two, in the same rounds: the n-gram drafter in a process of its own on --draft-core
(backends/draft, what decode.draft_devices serves), its proposals taken when ready, never
waited for; reported beside the in-process drafter, with how many of its proposals served.
With --own-history-too the in-process drafter also runs without its corpus of finished
requests (each sequence's own history only), in the same rounds. With --draft-model PATH
("self": the served model) a draft model drafts too (backends/core/model_drafter.py: its
greedy continuation), in the same rounds: in-process on the same core, and with
--remote-drafter also in a process of its own on --draft-core.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backends.core.model_runner import pin_threads

WORKLOADS = ("chatbot", "code", "summarization")
ADDITIVE = ("spec_steps", "spec_verify_rows", "spec_proposed", "spec_accepted", "spec_emitted")
BATCHES = (1, 8)


def run_batch(engine, prompts: list[list[int]], params, speculator) -> dict:
    """Generate for `prompts` together: TPOT per request, tokens, and the speculator's counts."""
    from backends.core.speculator import Speculator
    first, last, tokens = {}, {}, {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    steps = 0
    while engine.has_unfinished():
        started = time.perf_counter()                 # drafting included, as a served step
        drafts = speculator.drafts(engine.scheduler.running) \
            if speculator and engine.scheduler.decodes_next() else None
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


def measure(engine, groups: list[list[list[int]]], params, speculators: dict, rounds: int) -> dict:
    """ABBA rounds of none and each of `speculators` (name -> a new Speculator), in turn; each
    group of prompts runs together (batch 1: one prompt a group). One Speculator serves a
    round's groups one after another, as an instance serves its requests (its policy's
    measurements and the n-gram drafter's corpus of finished requests carry over); each round
    starts a new one, so a request never drafts from its own earlier run. Medians over every
    request's TPOT; each speculator's counts over the last round's groups. The in-process
    n-gram's figures ("ngram") at the top level, any other's under its name."""
    modes = ["none", *speculators]
    runs: dict[str, list[float]] = {m: [] for m in modes}
    outputs: dict[str, dict[str, list[int]]] = {m: {} for m in modes}
    counts: dict[str, list[dict]] = {}
    run_batch(engine, groups[0], params, None)                        # warm-up (kernels)
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            counts[mode] = []
            speculator = speculators[mode]() if mode != "none" else None
            before: dict = {}
            for g, prompts in enumerate(groups):
                res = run_batch(engine, prompts, params, speculator)
                runs[mode] += res["tpots"]
                outputs[mode].update({f"{g}/{req}": t for req, t in res["tokens"].items()})
                if res["spec"]:                       # this group's share of the running counts
                    counts[mode].append({k: v - before.get(k, 0) if k in ADDITIVE else v
                                         for k, v in res["spec"].items()})
                    before = res["spec"]
    none = statistics.median(runs["none"])
    figures = {m: figures_of(none, runs[m], outputs["none"], outputs[m], counts[m]) for m in speculators}
    ngram = figures.pop("ngram")
    return {"tpot_none_s": none, "tpot_ngram_s": ngram.pop("tpot_s"), **ngram, **figures,
            "samples": len(runs["none"])}


def figures_of(none: float, tpots: list[float], plain: dict, outputs: dict, counts: list[dict]) -> dict:
    """One speculator's median TPOT, speedup over `none`, acceptance and output check."""
    spec = {k: sum(c[k] for c in counts) for k in ("spec_proposed", "spec_accepted",
                                                   "spec_emitted", "spec_verify_rows")}
    tpot, proposed = statistics.median(tpots), spec["spec_proposed"]
    return {"tpot_s": tpot, "speedup": none / tpot,
            "acceptance": spec["spec_accepted"] / proposed if proposed else 0.0,
            "tokens_per_verify_row": (spec["spec_emitted"] / spec["spec_verify_rows"]
                                      if spec["spec_verify_rows"] else None),
            "tokens_per_step": statistics.fmean(c["tokens_per_step"] for c in counts) if counts else None,
            "verify_rows": spec["spec_verify_rows"],
            "identical_output": plain == outputs, "common_prefix": common_prefix(plain, outputs)}


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
    if any("own" in r for r in results["runs"].values()):
        lines += own_table(results)
    if any("remote" in r for r in results["runs"].values()):
        lines += remote_table(results)
    if any("model" in r for r in results["runs"].values()):
        lines += model_table(results)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def own_table(results: dict) -> list[str]:
    """The n-gram drafter with its corpus of finished requests (the default) beside the same
    drafter on each sequence's own history only, same rounds."""
    lines = ["", "## The corpus of finished requests vs each sequence's own history only", "",
             "| workload | batch | TPOT none (ms) | TPOT own history (ms) | speedup | acceptance "
             "| TPOT with the corpus (ms) | speedup | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        w, b = key.split("/")
        o = r["own"]
        lines.append(f"| {w} | {b} | {r['tpot_none_s'] * 1e3:.1f} | {o['tpot_s'] * 1e3:.1f} | {o['speedup']:.2f}x "
                     f"| {o['acceptance']:.1%} | {r['tpot_ngram_s'] * 1e3:.1f} | {r['speedup']:.2f}x "
                     f"| {r['acceptance']:.1%} |")
    return lines


def remote_table(results: dict) -> list[str]:
    """The n-gram drafter in a process of its own beside the in-process one, same rounds."""
    lines = ["", f"## The n-gram drafter in a process of its own (core {results['meta']['draft_core']})", "",
             "Its proposals are verified when they are ready (never waited for). Proposals served: "
             "draft() calls that found one aligned with the sequence; late: found one the sequence "
             "had already left behind.", "",
             "| workload | batch | TPOT none (ms) | TPOT in-process (ms) | TPOT own process (ms) | "
             "own / in-process | acceptance | proposals served | late | same output |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        w, b = key.split("/")
        x, d = r["remote"], r["remote"]["drafter"]
        lines.append(f"| {w} | {b} | {r['tpot_none_s'] * 1e3:.1f} | {r['tpot_ngram_s'] * 1e3:.1f} "
                     f"| {x['tpot_s'] * 1e3:.1f} | {r['tpot_ngram_s'] / x['tpot_s']:.2f}x "
                     f"| {x['acceptance']:.1%} | {d['drafts']} | {d['unaligned']} "
                     f"| {'yes' if x['identical_output'] else 'no'} ({x['common_prefix']:.0%}) |")
    return lines


def model_table(results: dict) -> list[str]:
    """A draft model (its greedy continuation) beside the n-gram drafter, same rounds."""
    m = results["meta"]
    remote = any("model-remote" in r for r in results["runs"].values())
    lines = ["", f"## A draft model as the drafter ({m['draft_model']})", "",
             "In-process: the draft model runs in the decode step, on the same core. "
             + (f"Own process: on core {m['draft_core']}, its proposals taken when ready. " if remote else "")
             + "Verify rows: sequence-steps that verified a draft (adaptive k stops drafting where "
             "the measured acceptance and step cost say it does not pay, then probes now and then).", "",
             "| workload | batch | TPOT none (ms) | TPOT n-gram (ms) | TPOT model in-process (ms) | speedup "
             "| acceptance | verify rows |" + (" TPOT model own process (ms) | speedup | acceptance |" if remote else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if remote else "")]
    for key, r in results["runs"].items():
        w, b = key.split("/")
        x = r["model"]
        row = (f"| {w} | {b} | {r['tpot_none_s'] * 1e3:.1f} | {r['tpot_ngram_s'] * 1e3:.1f} "
               f"| {x['tpot_s'] * 1e3:.1f} | {x['speedup']:.2f}x | {x['acceptance']:.1%} | {x['verify_rows']} |")
        if remote:
            y = r["model-remote"]
            row += f" {y['tpot_s'] * 1e3:.1f} | {y['speedup']:.2f}x | {y['acceptance']:.1%} |"
        lines.append(row)
    return lines


def speculators(args, engine, dep) -> tuple[dict, Any]:
    """name -> a new Speculator for each run: the in-process n-gram (and a draft model's with
    --draft-model), and with --remote-drafter ones drafting with drafter processes on
    --draft-core (shared by every run; returned too, by name)."""
    from backends.core.spec_decode import NgramDrafter
    from backends.core.spec_policy import AdaptiveK
    from backends.core.speculator import Speculator, make_speculator
    out = {"ngram": lambda: make_speculator("ngram", args.max_k)}
    if args.own_history_too:
        out["own"] = lambda: Speculator(NgramDrafter(cross_request=False), AdaptiveK(args.max_k))
    options = None
    if args.draft_model:
        from backends.core.model_drafter import ModelDrafter
        path = dep.model_path if args.draft_model == "self" else args.draft_model
        options = {"model": str(dep.resolved_model_path(model_path=path)), "dtype": engine.config.dtype,
                   "vocab_size": engine.model_config.vocab_size, "max_model_len": dep.max_model_len,
                   "num_kv_blocks": engine.config.limits.num_kv_blocks}
        # a new engine each round: no prefix cache of an earlier round's same prompts
        out["model"] = lambda: Speculator(ModelDrafter(**options), AdaptiveK(args.max_k))
    if not args.remote_drafter:
        return out, {}
    from backends.draft import remote_drafter
    vocab = engine.model_config.vocab_size
    methods = {"remote": ("ngram", None), **({"model-remote": ("model", options)} if options else {})}
    current: dict[str, Any] = {}

    def fresh(name: str):
        """A new drafter process each round, the last one closed: a drafter kept between
        rounds would draft this round's requests from its corpus (or cache) of their own
        outputs in an earlier round."""
        if (old := current.pop(name, None)) is not None:
            old.close()
        method, opts = methods[name]
        drafter = current[name] = remote_drafter(method, args.max_k, (args.draft_core,), vocab,
                                                 dep.max_model_len, opts)
        if not drafter.wait_up(120):
            raise SystemExit(f"the {name} drafter process did not come up in 120 s")
        return Speculator(drafter, AdaptiveK(args.max_k))
    for name in methods:
        out[name] = lambda name=name: fresh(name)
    return out, current


def run_workloads(args, engine, path: str, systems: dict, drafters: dict) -> dict:
    """measure() for each workload and batch size; the n-gram drafter process's counts (its
    last round's: a new process each round)."""
    import dataclasses

    from backends.core.sampling import SamplingParams
    from client.bench.workloads import LengthCaps, WorkloadSpec, load_workload
    runs = {}
    for name in args.workloads:
        spec = WorkloadSpec(name, max(BATCHES), seed=0,
                            caps=LengthCaps(max_prompt_tokens=args.max_prompt,
                                            max_output_tokens=args.max_tokens))
        requests = load_workload(spec, path).requests
        for batch in BATCHES:
            prompts = [list(r.prompt_ids) for r in requests]
            groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
            r = runs[f"{name}/{batch}"] = measure(engine, groups, params, systems, args.rounds)
            drafter = drafters.get("remote")
            if drafter:
                r["remote"]["drafter"] = dataclasses.asdict(drafter.counts)
            print(f"{name:14s} batch {batch}: TPOT none {r['tpot_none_s'] * 1e3:6.1f} ms  ngram "
                  f"{r['tpot_ngram_s'] * 1e3:6.1f} ms  {r['speedup']:.2f}x  acceptance "
                  f"{r['acceptance']:.1%}  same output {r['identical_output']} "
                  f"({r['common_prefix']:.0%} before the first difference)"
                  + (f"  own process {r['remote']['tpot_s'] * 1e3:6.1f} ms" if drafter else ""), flush=True)
    return runs


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
    ap.add_argument("--remote-drafter", action="store_true",
                    help="also the n-gram drafter in a process of its own (backends/draft), side by side")
    ap.add_argument("--own-history-too", action="store_true",
                    help="also the n-gram drafter without its corpus of finished requests, side by side")
    ap.add_argument("--draft-model", default=None,
                    help="also a draft model as the drafter, side by side: a checkpoint, or 'self'")
    ap.add_argument("--draft-core", type=int, default=None,
                    help="that drafter's core (default: the core after --core)")
    args = ap.parse_args()
    if args.draft_core is None:
        args.draft_core = (args.core + 1) % (os.cpu_count() or 1)
    pin_threads([args.core])                        # before the first torch op
    import dataclasses

    from backends.core.engine import EngineConfig, LLMEngine
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
    systems, drafters = speculators(args, engine, dep)
    try:
        results = {"runs": run_workloads(args, engine, path, systems, drafters)}
    finally:
        for d in drafters.values():
            d.close()
    results["meta"] = {"command": "python -m benchmarks.spec_decode_engine " + " ".join(sys.argv[1:]),
                       "machine": f"{os.cpu_count()} cores", "core": args.core,
                       "load_before": load_before,
                       "load_after": [round(x, 2) for x in os.getloadavg()],
                       "max_tokens": args.max_tokens, "max_k": args.max_k, "rounds": args.rounds,
                       "draft_core": args.draft_core if args.remote_drafter else None,
                       "draft_model": args.draft_model}
    write(results, args.out)
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
