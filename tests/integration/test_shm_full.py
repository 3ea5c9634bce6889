"""/dev/shm too small at start and full at run time, with the real tritonserver: the scenario
(tests/integration/shm_full_child.py) runs in a private mount namespace whose /dev/shm is a
tmpfs sized from the deployment's need, so filling it touches nothing else on the machine.
Skipped where mount namespaces are not allowed (an unprivileged container)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("shm_full_child.py")


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs root and mount namespaces (unshare -m)")
def test_shm_too_small_at_start_and_full_while_serving(tmp_path, gguf_path):
    run = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(CHILD),
                          str(tmp_path), str(gguf_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))

    # too small: refused before anything starts, with what is needed and what is free
    assert "not enough shared memory" in out["start_small"] and "--shm-size" in out["start_small"]
    assert out["left_after_small"] == []

    # full while serving: every request ends (tokens or a clear error) instead of hanging
    assert out["before"]["error"] is None and out["before"]["tokens"] == 8
    assert out["free_when_full"] < (1 << 20)
    for r in out["while_full"]:
        assert r["seconds"] < 90, r
        assert (r["error"] is None and r["tokens"] == 24) or r["error"], r
    # and once there is room again it serves, holds nothing, leaves nothing behind
    assert out["after"]["error"] is None and out["after"]["tokens"] == 8, out["after"]
    assert out["kv_free"] is True and out["leases"] == 0
    assert out["left_after_stop"] == []
