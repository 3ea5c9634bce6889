"""`python -m client "prompt"`: stream a completion from a running DistServe on Triton.

Text goes to stdout as it arrives; with --timing, client-measured and server-reported
latencies go to stderr. Exit status: 0 on success, 1 on a server error or an unreachable
server (one line on stderr), 2 on bad arguments, 130 on Ctrl-C (the request is cancelled).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from deploy.contract import DISTSERVE

from .results import Completion, DistServeError
from .sdk import DEFAULT_PORTS, DistServeClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", help='the prompt ("-" reads it from stdin)')
    p.add_argument("--url", help="Triton host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=sorted(DEFAULT_PORTS), default="http",
                   help="default: http")
    p.add_argument("--model", default=DISTSERVE, help=f"default: {DISTSERVE}")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message (the chat template applies)")
    p.add_argument("--system", help="with --chat: a system message first")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="S",
                   help="a stop string (repeat for more, as ./build.sh generate --stop)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--min-tokens", type=int, help="EOS and stop tokens are banned until this many are out")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens of the prompt and output")
    p.add_argument("--presence-penalty", type=float, help="in [-2, 2]: OpenAI's, over the output")
    p.add_argument("--frequency-penalty", type=float, help="in [-2, 2]: OpenAI's, over the output")
    p.add_argument("--bad-word", dest="bad_words", action="append", metavar="W",
                   help="a string never to generate (repeat the flag for more)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="one response with the whole text instead of streaming")
    p.add_argument("--timing", action="store_true", help="print latencies to stderr")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait at each step (default: 120)")
    return p.parse_args(argv)


def request_kwargs(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> dict[str, Any]:
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    kwargs: dict[str, Any] = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                  stop=args.stop, ignore_eos=args.ignore_eos,
                                  min_tokens=args.min_tokens,
                                  repetition_penalty=args.repetition_penalty,
                                  presence_penalty=args.presence_penalty,
                                  frequency_penalty=args.frequency_penalty,
                                  bad_words=args.bad_words, return_timing=args.timing)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        kwargs["messages"] = system + [{"role": "user", "content": prompt}]
    else:
        kwargs["prompt"] = prompt
    return kwargs


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Completion:
    client = DistServeClient(args.url, protocol=args.protocol, model=args.model, timeout=args.timeout)
    kwargs = request_kwargs(args)
    if not args.stream:
        completion = client.generate(**kwargs)
        out.write(completion.text)
    else:
        with client.stream(**kwargs) as stream:
            for chunk in stream:
                out.write(chunk.text)
                out.flush()
            completion = stream.collect()
    if completion.text and not completion.text.endswith("\n"):
        out.write("\n")
    out.flush()
    if args.timing:
        err.write(format_timing(completion) + "\n")
    return completion


def format_timing(c: Completion) -> str:
    lines = [f"client: ttft {_ms(c.ttft_s)}  tpot {_ms(c.tpot_s)} (per chunk)  e2e {_ms(c.e2e_s)}"
             f"  chunks {c.num_chunks}  finish_reason {c.finish_reason}"]
    t = c.timing
    if t is not None:
        lines.append(f"server: ttft {_ms(t.ttft_s)}  tpot {_ms(t.tpot_s)} (per token)"
                     f"  e2e {_ms(t.e2e_s)}  prefill {_ms(t.prefill_s)}"
                     f"  prefill queue {_ms(t.prefill_queue_s)}"
                     f"  kv transfer {_ms(t.kv_transfer_s)} ({t.kv_bytes or 0} B)"
                     f"  tokens {t.prompt_tokens} in / {t.output_tokens} out")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DistServeError as e:
        sys.stdout.flush()
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:                  # the with block cancelled the request
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
