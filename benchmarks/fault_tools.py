"""Fault tools for a real server: the fault tests (tests/integration/test_faults.py) and the soak
(benchmarks.soak) use them to find an instance's python-backend stub, wait until the server serves
again after a fault, and check that nothing is left held (KV blocks, prefill leases, /dev/shm).

The per-instance stats come from the instance's control socket (`instance_stats`, kept with the
integration fixtures in tests/integration/conftest.py)."""
from __future__ import annotations

import os
import time

from backends.orchestrator.health import phase_of
from client import DistServeClient, DistServeError
from tests.integration.conftest import instance_stats, wait_kv_free

RECOVER_S = 120.0                   # the reloaded instance serves again within this
KV_POOL_PREFIX = "distserve-kv-"    # kvtransfer's shared-memory KV pools


def segments(prefix: str) -> set[str]:
    """The /dev/shm entries whose names start with `prefix`."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def kv_segments() -> set[str]:
    return segments(KV_POOL_PREFIX)


def stub_pid(server, model: str) -> int:
    """The python backend stub of `model`'s (only) instance (an engine instance's model:
    deploy.contract.instance_model, e.g. "decode_1")."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == server.process.pid and any(a.endswith(f"/{model}/1/model.py".encode()) for a in cmd):
            return int(pid)
    raise AssertionError(f"no stub for {model}")


def serves_again(server, since: float, recover_s: float = RECOVER_S, protocol: str = "grpc") -> float:
    """Seconds from `since` (time.monotonic) until a normal request succeeds; AssertionError
    if none did within `recover_s`. One request at a time, a second apart, over `protocol`."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = DistServeClient(url, protocol, timeout=30)
    while True:
        try:
            assert client.generate("Hello", max_tokens=4, ignore_eos=True).text
            return time.monotonic() - since
        except DistServeError:
            assert time.monotonic() - since < recover_s, "the server did not recover"
            time.sleep(1.0)


def settled(server, instance_ids: tuple[str, ...] = ("prefill-0", "decode-0")) -> None:
    """Every KV block of these instances free (within 30 s), no prefill lease held."""
    wait_kv_free(server, instance_ids, timeout=30)
    for i in instance_ids:
        if phase_of(i) == "prefill":
            assert instance_stats(server, i)["leases"] == 0, f"{i} holds a lease"


def held(server, instance_ids: tuple[str, ...]) -> dict[str, dict]:
    """What each instance still holds: KV blocks in use, prefill leases (0 on decode), requests
    running or queued; {"error": ...} for an instance that does not answer."""
    out = {}
    for i in instance_ids:
        try:
            s = instance_stats(server, i)
        except Exception as e:                  # noqa: BLE001 - a dead instance is a finding
            out[i] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[i] = {"kv_blocks_used": s["kv_blocks_used"], "leases": s.get("leases", 0),
                  "running": s["running"], "queue_depth": s["queue_depth"], "pid": s["pid"]}
    return out


def wait_idle(server, instance_ids: tuple[str, ...], timeout: float) -> tuple[dict[str, dict], float]:
    """Poll `held` until no instance holds anything (or `timeout`); (the last reading, seconds
    waited)."""
    start = time.monotonic()
    while True:
        state = held(server, instance_ids)
        if all(not s.get("error") and not (s["kv_blocks_used"] or s["leases"] or s["running"]
                                           or s["queue_depth"]) for s in state.values()):
            return state, time.monotonic() - start
        if time.monotonic() - start >= timeout:
            return state, time.monotonic() - start
        time.sleep(0.5)
