"""Batch-1 TPOT with and without n-gram speculation, in-process on one pinned core.

    python -m benchmarks.spec_decode_engine [--core 0] [--k 4] [--max-tokens 64] [--rounds 2]

For a summarization-like prompt (the answer repeats the input) and a chat prompt, one engine
(the default model, bf16, the engine's default weight format) generates greedily with no
drafts and with the n-gram drafter proposing k tokens before every step (co-located: drafting
time counts), taking turns per round. TPOT = decode time / (tokens - 1) after an untimed
prefill step. Prints TPOT both ways, their ratio, acceptance rate and tokens per verify row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from backends.core.model_runner import pin_threads

ARTICLE = ("The city council met on Tuesday to discuss the new park. The new park will have a "
           "playground, a pond and a garden. The council voted to build the new park next year. "
           "The mayor said the new park will have a playground, a pond and a garden for every "
           "family in the city.")
PROMPTS = {
    "summarization": [{"role": "user", "content": ARTICLE + "\n\nRepeat the article above, "
                       "word for word, then summarize it in one sentence."}],
    "chat": [{"role": "user", "content": "What are three good habits for staying healthy?"}],
}


def run_once(engine, prompt: list[int], params, drafter, k: int) -> tuple[float, int, object]:
    """(decode seconds, tokens generated, spec stats) for one request."""
    from backends.core.spec_decode import SpecStats, propose_drafts
    engine.spec_stats = SpecStats()
    engine.add_request("r", prompt, params)
    engine.step()                                   # prefill + first token, untimed
    num_tokens, start = 1, time.perf_counter()
    while engine.has_unfinished():
        drafts = propose_drafts(engine.scheduler.running, drafter, k) if drafter else None
        num_tokens += sum(len(o.new_token_ids) for o in engine.step(drafts=drafts))
    return time.perf_counter() - start, num_tokens, engine.spec_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the project's default model)")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    pin_threads([args.core])                        # before the first torch op
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.sampling import SamplingParams
    from backends.core.spec_decode import NgramDrafter
    from backends.core.tokenizer import Tokenizer
    from deploy.deployment import DEFAULT_MODEL_PATH

    path = str(args.model or DEFAULT_MODEL_PATH)
    tok = Tokenizer.load(path)
    engine = LLMEngine.from_path(path, EngineConfig(limits=EngineLimits(num_kv_blocks=64)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    drafter = NgramDrafter()
    print(f"load average before: {os.getloadavg()}  core {args.core}  k={args.k}  "
          f"max_tokens={args.max_tokens}  rounds={args.rounds}")
    for name, messages in PROMPTS.items():
        prompt = tok.encode(tok.apply_chat_template(messages))
        run_once(engine, prompt, params, drafter, args.k)               # warm-up
        tpot = {"none": [], "ngram": []}
        stats = None
        for r in range(args.rounds):
            for mode in (("none", "ngram") if r % 2 == 0 else ("ngram", "none")):
                secs, n, s = run_once(engine, prompt, params, drafter if mode == "ngram" else None, args.k)
                tpot[mode].append(secs / (n - 1))
                stats = s if mode == "ngram" else stats
        base, spec = statistics.median(tpot["none"]), statistics.median(tpot["ngram"])
        print(f"{name:14s} prompt {len(prompt):4d} tok | TPOT none {base * 1e3:6.1f} ms  "
              f"ngram {spec * 1e3:6.1f} ms  speedup {base / spec:4.2f}x | acceptance "
              f"{stats.acceptance_rate:5.1%}  tokens/verify {stats.tokens_per_verify:4.2f}  "
              f"verify rows {stats.num_verify_rows}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
