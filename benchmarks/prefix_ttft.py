"""A chat's second turn on the served default deployment: TTFT of a prompt whose first ~1,500
tokens were served a moment earlier, over a cold prompt of the same length, prefix cache on
and off, side by side in one run.

    python -m benchmarks.prefix_ttft [--history 1500] [--new 60] [--reps 4] [--out docs/prefix_ttft]

For each setting (prefix_caching on, then off: the same deployment otherwise) a server is
started; per repetition, three requests of one output token each, one at a time: the first
turn (a real ShareGPT conversation's first `history` tokens), the second turn (that history
plus `new` tokens of the conversation's next message: it repeats the first turn's prompt
token for token) and a cold prompt of the second turn's length (another conversation, never
sent before). The order of the second turn and the cold prompt alternates between
repetitions. TTFT is the server's own (request in -> first token out, the orchestrator's
clock), so client overhead is left out. Reported: the median second-turn / cold TTFT ratio per
setting. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def conversations(num: int, length: int, tokenizer) -> list[list[int]]:
    """`num` token sequences of at least `length` tokens, each one ShareGPT transcript."""
    from client.bench import datasets as ds
    out = []
    for record in ds.read_sharegpt(ds.dataset_path(ds.SHAREGPT_FILE)).conversations:
        ids = tokenizer.encode(ds.transcript(record, 40 * length), add_special_tokens=False)
        if len(ids) >= length:
            out.append(ids[:length])
            if len(out) == num:
                return out
    raise ValueError(f"fewer than {num} conversations of {length} tokens")


def run_setting(dep, texts: list[list[int]], history: int, reps: int) -> dict:
    from client import DistServeClient
    from deploy.render import render_repository
    from deploy.server import TritonServer, free_ports
    work = Path(tempfile.mkdtemp(prefix="prefix-ttft-"))
    repo = render_repository(dep, work / "model_repository", require_code=True)
    http_port, grpc_port, metrics_port = free_ports(3)
    ratios, rows = [], []
    with TritonServer(repo, run_dir=work / "run", http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port) as server:
        client = DistServeClient(server.grpc_url, "grpc", timeout=300)

        def ttft(ids: list[int]) -> float:
            return client.generate(input_ids=ids, max_tokens=1, return_timing=True).timing.ttft_s
        ttft(texts[-1][:64])                                        # warm-up
        for r in range(reps):
            turn, cold = texts[2 * r], texts[2 * r + 1]
            first = ttft(turn[:history])
            if r % 2 == 0:
                second, cold_s = ttft(turn), ttft(cold)
            else:
                cold_s, second = ttft(cold), ttft(turn)
            rows.append({"first_turn_s": first, "second_turn_s": second, "cold_s": cold_s})
            ratios.append(second / cold_s)
    return {"ratio_median": statistics.median(ratios), "ratios": ratios, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=1500)
    ap.add_argument("--new", type=int, default=60)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/prefix_ttft"))
    args = ap.parse_args()
    from backends.core.tokenizer import Tokenizer
    from client.bench.compare import without_prefix_caching
    from deploy.deployment import default_deployment
    base = default_deployment()
    tok = Tokenizer.load(str(base.resolved_model_path()))
    texts = conversations(2 * args.reps + 1, args.history + args.new, tok)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = {}
    for name, dep in (("cache on", base), ("cache off", without_prefix_caching(base))):
        results[name] = run_setting(dep, texts, args.history, args.reps)
        print(f"{name}: second turn / cold TTFT, median {results[name]['ratio_median']:.3f} "
              f"({[round(x, 3) for x in results[name]['ratios']]})", flush=True)
    meta = {"command": "python -m benchmarks.prefix_ttft " + " ".join(sys.argv[1:]),
            "history_tokens": args.history, "new_tokens": args.new, "reps": args.reps,
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    lines = ["# Second-turn TTFT with the prefix cache (served, default deployment)", "",
             f"Command: `{meta['command']}`; load average {load_before} before, "
             f"{meta['load_after']} after. Per repetition: the first turn ({args.history} tokens), "
             f"the second turn (the same {args.history} tokens + {args.new} new ones) and a cold "
             f"prompt of {args.history + args.new} tokens, one output token each; TTFT as the "
             "server measured it.", "",
             "| setting | second turn / cold TTFT (median) | per repetition | second turn (s) | cold (s) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | **{r['ratio_median']:.3f}** | {', '.join(f'{x:.3f}' for x in r['ratios'])} "
                     f"| {statistics.median(x['second_turn_s'] for x in r['rows']):.3f} "
                     f"| {statistics.median(x['cold_s'] for x in r['rows']):.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
