"""python -m deploy render | serve | show-default.

    python -m deploy render --out DIR [--deployment FILE | --baseline B] [--num-cores N]
    python -m deploy serve [--deployment FILE | --baseline B] [--model PATH] [--host 127.0.0.1]
                           [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
                           [--openai-port 8003 (0: none)] [--served-model-name NAME]
    python -m deploy show-default [--baseline B] [--num-cores N]   # print the deployment JSON

--baseline colocated|chunked serves the colocated baseline instead of DistServe, on the same
cores (one instance per core, each running both phases; `chunked` adds chunked prefill under
--token-budget tokens per step). Call it as model `distserve_colocated`, like `distserve`.

serve also starts the OpenAI-compatible API (frontend/) on --openai-port, in this process, in
front of the server's gRPC port; it calls whichever front-end model the deployment serves, as
--served-model-name (default: the model file's stem), and stops before the server does.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from deploy.contract import DISTSERVE, DISTSERVE_BATCHED, DISTSERVE_COLOCATED
from deploy.deployment import (DEFAULT_CHUNKED_TOKEN_BUDGET, DEFAULT_MODEL_PATH, ROOT, Deployment,
                               colocated_deployment, default_deployment)
from deploy.render import SRC_REPO, missing_code, render_repository
from deploy.server import ServerError, TritonServer
from frontend import DEFAULT_PORT as OPENAI_PORT
from frontend import make_server, served_model_name
from frontend.server import FrontendError, FrontendServer


BASELINES = ("colocated", "chunked")


def built_in_deployment(args: argparse.Namespace) -> Deployment:
    """The default deployment, or with --baseline the colocated baseline on the same cores."""
    num_cores = getattr(args, "num_cores", None)
    if args.baseline is None:
        return default_deployment(DEFAULT_MODEL_PATH, num_cores)
    return colocated_deployment(DEFAULT_MODEL_PATH, num_cores, chunked_prefill=args.baseline == "chunked",
                                token_budget=args.token_budget)


def load_deployment(args: argparse.Namespace) -> Deployment:
    check_host = not getattr(args, "other_host", False)
    if getattr(args, "deployment", None):
        if args.baseline is not None:
            raise ValueError("give --deployment or --baseline, not both")
        deployment = Deployment.load(args.deployment, check_host=check_host)
    else:
        deployment = built_in_deployment(args)
    if getattr(args, "model", None):
        deployment = deployment.with_model_path(Path(args.model).resolve())
    return deployment


def cmd_render(args: argparse.Namespace) -> int:
    deployment = load_deployment(args)
    out = render_repository(deployment, args.out, src_repo=args.src)
    missing = missing_code(args.src)
    print(f"rendered {out}" + (f" (configs only for {missing}: no 1/model.py yet)" if missing else ""))
    return 0


def cmd_show_default(args: argparse.Namespace) -> int:
    print(built_in_deployment(args).to_json(indent=2))
    return 0


def usage_text(server: TritonServer, deployment: Deployment, api: FrontendServer | None = None,
               served_name: str = "") -> str:
    http = f"http://{server.http_url}"
    body = '{"text_input": "Hello", "max_tokens": 32}'
    stream_body = '{"text_input": "Hello", "max_tokens": 32, "stream": true}'
    lines = [f"DistServe is ready. HTTP {http}  gRPC {server.grpc_url}  metrics {server.metrics_url}"]
    for system, model in (("disaggregated", DISTSERVE), ("colocated", DISTSERVE_COLOCATED)):
        if system in deployment.systems:
            lines += [f"  curl -s {http}/v2/models/{model}/generate -d '{body}'",
                      f"  curl -sN {http}/v2/models/{model}/generate_stream -d '{stream_body}'",
                      f'  .venv/bin/python -m client --url {server.http_url} --model {model} "Hello"']
    if deployment.batched_front_end:
        lines.append(f"  {DISTSERVE_BATCHED}: the same with a leading batch dimension of 1 on every "
                     "tensor (TensorRT-LLM clients' [1, 1] shapes)")
    if api is not None:
        chat = json.dumps({"model": served_name, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "Hello"}]})
        lines += [f"OpenAI-compatible API {api.url} (model {served_name!r})",
                  f"  curl -s {api.url}/chat/completions -H 'Content-Type: application/json' -d '{chat}'"]
    return "\n".join(lines + [f"Server log: {server.log_file}. Ctrl-C stops the server."])


def openai_frontend(args: argparse.Namespace, server: TritonServer, deployment: Deployment,
                    served_name: str) -> FrontendServer | None:
    """The OpenAI-compatible API in front of `server`, bound now (OSError if the port is taken),
    serving once started; None with --openai-port 0."""
    if not args.openai_port:
        return None
    model = DISTSERVE if "disaggregated" in deployment.systems else DISTSERVE_COLOCATED
    return make_server(server.grpc_url, served_name, host=args.host, port=args.openai_port,
                       triton_model=model, max_model_len=deployment.max_model_len)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    deployment = load_deployment(args)
    model_file = deployment.resolved_model_path()
    if not model_file.exists():
        print(f"error: model file {model_file} not found (run ./build.sh setup)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir / "model_repository", ignore_errors=True)
    try:
        repo = render_repository(deployment, run_dir / "model_repository", src_repo=args.src,
                                 require_code=True)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    deployment.save(run_dir / "deployment.json")
    server = TritonServer(repo, run_dir=run_dir, host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose)
    served_name = args.served_model_name or served_model_name(deployment.model_path)
    try:
        api = openai_frontend(args, server, deployment, served_name)
    except OSError as exc:
        print(f"error: cannot serve the OpenAI API on {args.host}:{args.openai_port}: {exc}",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        print(f"starting tritonserver (log: {server.log_file}) ...", flush=True)
        server.start().wait_ready(args.ready_timeout)
        if api is not None:
            api.start()
        print(usage_text(server, deployment, api, served_name), flush=True)
        while server.is_alive() or server.is_restarting():     # the supervisor may restart it
            time.sleep(0.5)
        print(f"error: tritonserver exited with code {server.process.returncode}\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    except (ServerError, FrontendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        if api is not None:
            api.stop()
        server.stop()


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", choices=BASELINES,
                        help="the colocated baseline on the same cores instead of DistServe "
                             "(chunked: with chunked prefill)")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_CHUNKED_TOKEN_BUDGET,
                        help="tokens per step with --baseline chunked (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the model repository")
    render.add_argument("--out", required=True, help="output repository directory")
    render.add_argument("--deployment", help="deployment JSON (default: the default deployment)")
    add_baseline_arguments(render)
    render.add_argument("--num-cores", type=int, help="render the default deployment for an N-core host")
    render.add_argument("--other-host", action="store_true",
                        help="the deployment is for another host: skip the checks against this one")
    render.add_argument("--src", default=str(SRC_REPO), help="source repository with the adapters' code")
    render.set_defaults(func=cmd_render)
    show = sub.add_parser("show-default", help="print the default deployment JSON")
    add_baseline_arguments(show)
    show.add_argument("--num-cores", type=int)
    show.set_defaults(func=cmd_show_default)
    serve = sub.add_parser("serve", help="render into a run dir, start tritonserver, stay in the foreground")
    serve.add_argument("--deployment", help="deployment JSON (default: the default deployment)")
    add_baseline_arguments(serve)
    serve.add_argument("--model", help="model file; overrides the deployment's model_path")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--openai-port", type=int, default=OPENAI_PORT,
                       help="port of the OpenAI-compatible API (default %(default)s; 0: none)")
    serve.add_argument("--served-model-name",
                       help="the model's name in the OpenAI API (default: the model file's stem)")
    serve.add_argument("--run-dir", default=str(ROOT / "run" / "serve"),
                       help="where the rendered repository, deployment.json and server.log go")
    serve.add_argument("--src", default=str(SRC_REPO), help="source repository with the adapters' code")
    serve.add_argument("--ready-timeout", type=float, default=600.0)
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
