"""Offline generation for developers: `python -m backends.core.cli generate "prompt" --model M`."""
from __future__ import annotations

import argparse
import sys
import time

from backends.core.engine import EngineConfig
from backends.core.limits import EngineLimits
from backends.core.llm import LLM
from backends.core.model_runner import pin_threads
from backends.core.sampling import SamplingParams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends.core.cli")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion for one prompt")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="a .gguf file or a Hugging Face model folder")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        pin_threads(None, args.threads)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop=tuple(args.stop))
        llm = LLM.from_path(args.model, EngineConfig(dtype=args.dtype,
                                                     limits=EngineLimits(num_kv_blocks=256)))
        start = time.perf_counter()
        first, n = None, 0
        for delta in llm.stream(args.prompt, params, chat=args.chat):
            first = first or time.perf_counter()
            n += 1
            sys.stdout.write(delta)
            sys.stdout.flush()
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    end = time.perf_counter()
    ttft = (first or end) - start
    print(f"\n[TTFT {ttft * 1000:.0f} ms, {n} text chunks in {end - start:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
