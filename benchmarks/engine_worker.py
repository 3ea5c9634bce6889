"""One benchmark subject in its own process, pinned to one core, driven over stdin/stdout.

    <venv>/bin/python -m benchmarks.engine_worker SUBJECT CORE

Lifecycle: pin to CORE (before any numeric library loads), move fd 1 aside for replies (so
whatever a library prints goes to stderr), then answer one JSON line per command line:
    {"op": "build", "spec": {...}}               -> {"ok": true, "info": {...}}
    {"op": "prefill", "ids": [...]}              -> {"ok": true, "seconds": s}   (prompt -> first token)
    {"op": "decode", "prompts": [[...]], "steps": S} -> {"ok": true, "seconds": [s, ...]}  (per step)
    {"op": "info"}                               -> {"ok": true, "info": {...}}
    {"op": "quit"}                               -> exits
A failing command answers {"ok": false, "error": "..."} and the worker keeps serving.

This module imports only the standard library at the top: it also runs in the peers' venvs,
where neither torch (llama.cpp) nor our own packages' dependencies may exist. A subject is a
class with `__init__(spec)`, `info() -> dict`, `prefill(ids) -> float`,
`decode(prompts, steps) -> list[float]`.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

SUBJECTS = {                    # name -> "module:Class", imported only inside the worker
    "ours": "benchmarks.engine_subjects:Ours",
    "hf": "benchmarks.engine_subjects:HF",
    "vllm": "benchmarks.peers.vllm_subject:VLLM",
    "llamacpp": "benchmarks.peers.llamacpp_subject:LlamaCpp",
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def subject_class(name: str) -> type:
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r}; choose one of {sorted(SUBJECTS)}")
    module, cls = SUBJECTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpus_of_threads() -> list[int]:
    """Every CPU any thread of this process may run on (a subject's own threads included)."""
    cpus: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            cpus |= os.sched_getaffinity(int(tid))
        except OSError:                 # the thread ended meanwhile
            pass
    return sorted(cpus)


class Usage:
    """CPU seconds (all threads) per wall second over the measurements: about 1.0 on one core."""

    def __init__(self) -> None:
        self.cpu_s = self.wall_s = 0.0

    def measure(self, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            return fn()
        finally:
            self.cpu_s += time.process_time() - c0
            self.wall_s += time.perf_counter() - t0

    def info(self) -> dict:
        return {"cpu_per_wall": round(self.cpu_s / self.wall_s, 3) if self.wall_s else None,
                "measured_wall_s": round(self.wall_s, 2), "cpus_of_threads": cpus_of_threads(),
                "rss_bytes": rss_bytes()}


def handle(subject_name: str, state: dict, msg: dict) -> dict:
    op = msg.get("op")
    if op == "build":
        state["subject"], state["usage"] = subject_class(subject_name)(msg["spec"]), Usage()
        return {"ok": True, "info": {**state["subject"].info(), **state["usage"].info()}}
    subject, usage = state.get("subject"), state.get("usage")
    if subject is None:
        raise RuntimeError(f"{op!r} before a successful build")
    if op == "info":
        return {"ok": True, "info": {**subject.info(), **usage.info()}}
    if op == "prefill":
        return {"ok": True, "seconds": usage.measure(lambda: subject.prefill(msg["ids"]))}
    if op == "decode":
        return {"ok": True, "seconds": usage.measure(lambda: subject.decode(msg["prompts"], msg["steps"]))}
    raise ValueError(f"unknown op {op!r}")


def serve(subject_name: str, requests, replies) -> None:
    state: dict = {}
    for line in requests:
        msg = json.loads(line)
        if msg.get("op") == "quit":
            return
        try:
            reply = handle(subject_name, state, msg)
        except Exception as e:          # reported to the parent, which decides to skip the subject
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    subject_name, core = sys.argv[1], int(sys.argv[2])
    os.sched_setaffinity(0, {core})
    for var in THREAD_ENV:
        os.environ[var] = "1"
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                       # library chatter on stdout goes to the log, not the protocol
    sys.stdout = sys.stderr
    serve(subject_name, sys.stdin, replies)


if __name__ == "__main__":
    main()
