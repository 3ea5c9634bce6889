"""Start-up and recovery of the default deployment, and reading the model file's metadata.

    python -m benchmarks.startup --reps 3 --out docs/startup

Each repetition, one after the other on this machine:
- **read**: the default GGUF's metadata and tensor index with gguf-py's `GGUFReader` and with
  `backends.core.gguf_file.GGUFFile` (where the tree has it), in this process;
- **start**: a fresh tritonserver of the default deployment (`deploy.deployment.default_deployment`,
  rendered into a temporary repository) from `start()` until it is ready, and until its first
  request (4 tokens) is served;
- **recover**: SIGKILL of decode-0's stub, until a request is served again (the orchestrator's
  monitor has Triton reload it; benchmarks.fault_tools.serves_again, one try a second).

To compare two commits, run the same file in a clean worktree of each, one after the other
(the file only uses deploy/ and the fault tools, which older trees have), and read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def read_times(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    from gguf import GGUFReader
    t = time.perf_counter()
    GGUFReader(path)
    out["gguf_py_s"] = time.perf_counter() - t
    try:
        from backends.core.gguf_file import GGUFFile
    except ImportError:                     # a tree from before it
        return out
    t = time.perf_counter()
    GGUFFile(path)
    out["gguf_file_s"] = time.perf_counter() - t
    return out


def serve_once(model: Path, work: Path) -> dict[str, float]:
    from benchmarks.fault_tools import serves_again, stub_pid
    from deploy.deployment import default_deployment
    from deploy.render import render_repository
    from deploy.server import TritonServer
    from deploy.server_setup import free_ports
    repo = render_repository(default_deployment(str(model)), work / "model_repository", require_code=True)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, run_dir=work / "run", http_port=http, grpc_port=grpc, metrics_port=metrics)
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_ready(600)
        out = {"start_to_ready_s": time.monotonic() - t0}
        out["start_to_first_request_s"] = serves_again(server, t0)
        killed = time.monotonic()
        os.kill(stub_pid(server, "decode_0"), signal.SIGKILL)
        out["decode_kill_to_served_s"] = serves_again(server, killed)
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--label", default="", help="a name for this tree in the output (e.g. a commit)")
    p.add_argument("--out", type=Path, help="write OUT.json (appends this run to those already there)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"{args.model} not found (run ./build.sh setup)")
    runs, load_before = [], os.getloadavg()[0]
    for _ in tqdm(range(args.reps), desc="start-up runs", unit="run", disable=None):
        rec: dict[str, Any] = read_times(args.model)
        with tempfile.TemporaryDirectory(prefix="startup-bench-") as work:
            rec.update(serve_once(args.model.resolve(), Path(work)))
        rec["load_after"] = os.getloadavg()[0]
        runs.append(rec)
        print(json.dumps(rec), flush=True)
    result = {"label": args.label, "command": "python -m benchmarks.startup " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": platform.processor() or platform.machine(), "load_before": load_before, "runs": runs}
    if args.out:
        path = args.out.with_suffix(".json")
        old = json.loads(path.read_text()) if path.is_file() else {"results": []}
        old["results"].append(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
