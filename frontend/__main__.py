"""python -m frontend: the OpenAI-compatible API in front of a running Triton server.

    python -m frontend [--triton 127.0.0.1:8001] [--host 127.0.0.1] [--port 8003]
                       [--served-model-name NAME] [--triton-model distserve]

(`python -m deploy serve` starts it by itself, next to the server it starts.)
"""
from __future__ import annotations

import argparse
import sys

from deploy.contract import DISTSERVE
from deploy.deployment import DEFAULT_MODEL_PATH

from . import DEFAULT_PORT, make_server, served_model_name
from .backend import DEFAULT_TIMEOUT_S


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", default="127.0.0.1:8001", help="Triton's gRPC host:port")
    parser.add_argument("--triton-model", default=DISTSERVE,
                        help="the Triton model to call (default %(default)s; distserve_colocated "
                             "for the colocated baseline)")
    parser.add_argument("--served-model-name", default=served_model_name(DEFAULT_MODEL_PATH),
                        help="the model name clients use (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument("--max-model-len", type=int, help="the context length, shown in /v1/models")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for each response from Triton (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server = make_server(args.triton, args.served_model_name, host=args.host, port=args.port,
                             triton_model=args.triton_model, max_model_len=args.max_model_len,
                             timeout=args.timeout)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"OpenAI-compatible API on {server.url} (model {args.served_model_name!r}), "
          f"calling {args.triton_model} at {args.triton}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
