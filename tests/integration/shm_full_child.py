"""/dev/shm too small at start, and full at run time, on the real server (run by
tests/integration/test_shm_full.py inside a private mount namespace: `unshare -m`).

Here /dev/shm is a tmpfs of our own, sized from what the deployment needs, so filling it
touches no other process. Prints one JSON line of findings; the test judges them.

    unshare -m --propagation private python tests/integration/shm_full_child.py WORK_DIR GGUF
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from client import DistServeClient, DistServeError  # noqa: E402
from deploy.deployment import default_deployment  # noqa: E402
from deploy.render import render_repository  # noqa: E402
from deploy.server import TritonServer, free_ports  # noqa: E402
from deploy.server_setup import ServerError  # noqa: E402
from deploy.shm_space import SHM_DIR, checkpoint_nbytes, read_model_config, shm_free_bytes, \
    shm_need, stub_shm_bytes  # noqa: E402
from tests.integration.conftest import instance_stats, wait_kv_free  # noqa: E402

MIB = 1 << 20


def mount_shm(nbytes: int) -> None:
    subprocess.run(["umount", SHM_DIR], capture_output=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes},mode=1777", "tmpfs", SHM_DIR],
                   check=True)


def fill_shm() -> Path:
    """A file that takes every free byte of /dev/shm."""
    filler = Path(SHM_DIR, "filler")
    with open(filler, "wb") as f:
        size = shm_free_bytes()
        while size > 0:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                break
            except OSError:
                size -= MIB
    return filler


def server(repo: Path, run_dir: Path) -> TritonServer:
    http_port, grpc_port, metrics_port = free_ports(3)
    return TritonServer(repo, run_dir=run_dir, http_port=http_port, grpc_port=grpc_port,
                        metrics_port=metrics_port)


def ask(client: DistServeClient, prompt: str, max_tokens: int) -> dict:
    t0 = time.monotonic()
    try:
        out = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, return_token_ids=True)
        return {"tokens": len(out.token_ids), "text": bool(out.text),
                "error": None, "seconds": time.monotonic() - t0}
    except DistServeError as e:
        return {"tokens": 0, "error": str(e)[:300], "seconds": time.monotonic() - t0}


def main(work: Path, gguf: str) -> dict:
    deployment = dataclasses.replace(default_deployment(gguf), dtype="float32", max_model_len=2048,
                                     default_max_tokens=16)
    repo = render_repository(deployment, work / "model_repository", require_code=True)
    need = shm_need(deployment, read_model_config(Path(gguf)), checkpoint_nbytes(Path(gguf)),
                    stub_shm_bytes())
    need.pop(next((k for k in need if k.startswith("shared weights")), ""), None)  # go to tmp
    total = sum(need.values())
    out: dict = {"need_bytes": total}

    # 1. too small at start: refused before anything starts, nothing left
    mount_shm(total - 16 * MIB)
    try:
        server(repo, work / "run-small").start()
        out["start_small"] = "started"
    except ServerError as e:
        out["start_small"] = str(e)
    out["left_after_small"] = sorted(os.listdir(SHM_DIR))

    # 2. room at start, then /dev/shm filled up while serving
    mount_shm(total + 24 * MIB)
    srv = server(repo, work / "run")
    srv.start()
    try:
        srv.wait_ready(300)
        client = DistServeClient(srv.grpc_url, "grpc", timeout=90)
        out["before"] = ask(client, "Hello there", 8)
        filler = fill_shm()
        out["free_when_full"] = shm_free_bytes()
        long = "The quick brown fox jumps over the lazy dog. " * 150          # ~1500 tokens
        prompts = [long, "Hi", long, "Tell me a story", long, "Why?"]
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(prompts)) as pool:
            out["while_full"] = list(pool.map(lambda p: ask(client, p, 24), prompts))
        out["while_full_seconds"] = time.monotonic() - t0
        filler.unlink()
        deadline, again = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            again = ask(client, "Hello again", 8)
            if again["error"] is None:
                break
            time.sleep(1)
        out["after"] = again
        try:
            wait_kv_free(srv, ("prefill-0", "decode-0"), timeout=30)
            out["kv_free"] = True
        except AssertionError as e:
            out["kv_free"] = str(e)
        out["leases"] = instance_stats(srv, "prefill-0").get("leases")
    finally:
        srv.stop()
    out["left_after_stop"] = sorted(n for n in os.listdir(SHM_DIR) if n != "filler")
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
