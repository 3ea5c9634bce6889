"""Memory of n engine instances on one host: private weights vs one shared copy.

    python -m benchmarks.memory [--model PATH] [--formats bf16,int4] [--layouts 1+1,2+2]
                                [--out docs/bench_memory] [--share-in-harness]

For each weights format, layout (prefill + decode instances) and mode, starts that many engine
processes (spawn, one torch thread each), each building `LLMEngine.from_path(model,
EngineConfig(role=..., weights=W, shared_weights_dir=D or None, num_kv_blocks=small))` and then
reading one byte per page of every weight storage (what a first request does), and waits until
all are built. Every process returns its freed heap to the OS first (malloc_trim; share_module
does it too), so the loader's garbage does not count as the weights' cost. Then it sums, over
the processes, PSS and RSS from /proc/PID/smaps_rollup (PSS splits each shared page between
its mappers, so the sum is the host's real cost) and stops them. "shared" gives every process one fresh private directory D. `shared_by` says who shared
the weights: the engine (EngineConfig.shared_weights_dir), the harness (--share-in-harness:
share_module after building, for engines that do not share yet) or nobody. A format that fails
to build is reported with its error. Writes <out>.json and <out>.md.
"""
from __future__ import annotations
from backends.core.limits import EngineLimits

import argparse
import datetime
import json
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Job:
    model: str
    role: str
    weights: str
    shared_dir: str | None
    num_kv_blocks: int
    share_in_harness: bool


@dataclass
class Row:
    weights: str
    layout: str
    mode: str                   # private | shared
    num_processes: int
    pss_mib: float = 0.0
    rss_mib: float = 0.0
    pss_anon_mib: float = 0.0
    pss_file_mib: float = 0.0
    pss_shmem_mib: float = 0.0
    build_s: float = 0.0        # the slowest process's build time
    shared_by: str = ""
    error: str | None = None


def smaps_rollup(pid: int) -> dict[str, int]:
    """The rollup's fields, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ROLLUP_FIELDS:
            out[name] = int(rest.split()[0]) * 1024
    return out


def touch_weights(model) -> None:
    """Read one byte per page of every distinct storage, so mapped weights are resident."""
    import torch
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() in seen or not st.nbytes():
            continue
        seen.add(st.data_ptr())
        int(torch.empty(0, dtype=torch.uint8).set_(st)[::4096].sum())


def run_instance(job: Job, index: int, results, stop) -> None:
    """One engine process: build, touch, report, wait to be told to exit."""
    try:
        import torch
        torch.set_num_threads(1)
        from backends.core.engine import EngineConfig, LLMEngine
        from backends.core.weight_share import (checkpoint_key, release_free_memory, share_module,
                                                shared_info)
        t0 = time.perf_counter()
        weights, _, variant = job.weights.partition("+")      # "bf16+plain": prepacking off
        config = EngineConfig(role=job.role, weights=weights, shared_weights_dir=job.shared_dir, prepack_weights=variant != "plain",
                              limits=EngineLimits(num_kv_blocks=job.num_kv_blocks))
        model = LLMEngine.from_path(job.model, config).runner.model
        shared_by = "engine" if shared_info(model) else "none"
        if job.shared_dir and shared_by == "none" and job.share_in_harness:
            share_module(model, job.shared_dir, checkpoint_key(job.model, job.weights, config.dtype))
            shared_by = "harness"
        release_free_memory()           # both modes: the loader's freed heap is not the weights
        touch_weights(model)
        results.put(("ready", index, os.getpid(), time.perf_counter() - t0, shared_by))
    except BaseException as exc:     # report it; the parent decides
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        results.put(("error", index, os.getpid(), 0.0, line))
        return
    stop.wait(600)


def measure(model: str, weights: str, num_prefill: int, num_decode: int, shared: bool,
            num_kv_blocks: int, share_in_harness: bool, timeout_s: float) -> Row:
    roles = ["prefill"] * num_prefill + ["decode"] * num_decode
    row = Row(weights, f"{num_prefill}+{num_decode}", "shared" if shared else "private", len(roles))
    shared_dir = make_private_dir() if shared else None
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=run_instance, args=(Job(model, role, weights, shared_dir, num_kv_blocks,
                                                        share_in_harness), i, results, stop))
             for i, role in enumerate(roles)]
    try:
        for p in procs:
            p.start()
        reports = collect(procs, results, timeout_s)
        errors = sorted({r[4] for r in reports if r[0] == "error"})
        if errors:
            row.error = "; ".join(errors)
            return row
        totals = {name: sum(smaps_rollup(r[2]).get(name, 0) for r in reports) for name in ROLLUP_FIELDS}
        row.rss_mib, row.pss_mib = totals["Rss"] / MiB, totals["Pss"] / MiB
        row.pss_anon_mib, row.pss_file_mib = totals["Pss_Anon"] / MiB, totals["Pss_File"] / MiB
        row.pss_shmem_mib = totals["Pss_Shmem"] / MiB
        row.build_s = max(r[3] for r in reports)
        row.shared_by = ",".join(sorted({r[4] for r in reports}))
        return row
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        if shared_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)


def collect(procs: list, results, timeout_s: float) -> list[tuple]:
    """One report per process; a process that died without one becomes an error report."""
    reports: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    while len(reports) < len(procs):
        try:
            r = results.get(timeout=1.0)
            reports[r[1]] = r
            continue
        except queue.Empty:
            pass
        for i, p in enumerate(procs):
            if i not in reports and p.exitcode is not None:
                reports[i] = ("error", i, p.pid, 0.0, f"instance {i} exited with code {p.exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines not built after {timeout_s:.0f}s")
    return [reports[i] for i in range(len(procs))]


def make_private_dir() -> str:
    """What deploy/server.py gives a server run: a fresh 0700 directory, /dev/shm if it has room."""
    from deploy.server import make_shared_weights_dir
    return str(make_shared_weights_dir())


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        p, sep, d = item.partition("+")
        if not sep or not p.isdigit() or not d.isdigit() or int(p) + int(d) == 0:
            raise argparse.ArgumentTypeError(f"a layout is P+D instance counts (e.g. 2+2), got {item!r}")
        out.append((int(p), int(d)))
    return out


def savings(rows: list[Row]) -> list[dict]:
    """shared / private summed PSS per (weights, layout), where both were measured."""
    by = {(r.weights, r.layout, r.mode): r for r in rows if r.error is None}
    out = []
    for (w, layout, mode), r in by.items():
        private = by.get((w, layout, "private"))
        if mode == "shared" and private is not None:
            out.append({"weights": w, "layout": layout, "private_pss_mib": round(private.pss_mib, 1),
                        "shared_pss_mib": round(r.pss_mib, 1), "ratio": round(r.pss_mib / private.pss_mib, 3),
                        "saved_mib": round(private.pss_mib - r.pss_mib, 1), "shared_by": r.shared_by})
    return out


def markdown(report: dict) -> str:
    lines = ["# Memory: private weights vs one shared copy", "",
             f"`{report['command']}`; {report['timestamp']}; model `{report['model']}`; "
             f"{report['num_kv_blocks']} KV blocks per engine; sums over the engine processes "
             "(PSS splits shared pages between their mappers).", "",
             "| weights | P+D | mode | shared by | PSS MiB | RSS MiB | PSS anon | PSS file | PSS shmem "
             "| build s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        head = f"| {r['weights']} | {r['layout']} | {r['mode']} |"
        if r["error"]:
            lines.append(f"{head} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"{head} {r['shared_by']} | {r['pss_mib']:.0f} | {r['rss_mib']:.0f} | "
                     f"{r['pss_anon_mib']:.0f} | {r['pss_file_mib']:.0f} | {r['pss_shmem_mib']:.0f} | "
                     f"{r['build_s']:.1f} |")
    lines += ["", "| weights | P+D | private PSS MiB | shared PSS MiB | shared / private | saved MiB |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {s['weights']} | {s['layout']} | {s['private_pss_mib']} | {s['shared_pss_mib']} | "
              f"{s['ratio']} | {s['saved_mib']} |" for s in report["savings"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--formats", default="bf16,bf16+plain,int4,auto",
                   help="weights formats, comma-separated; '+plain': dense weights not prepacked "
                        "(prepacked oneDNN weights are private to a process)")
    p.add_argument("--layouts", type=parse_layouts, default=parse_layouts("1+1,2+2"))
    p.add_argument("--num-kv-blocks", type=int, default=64)
    p.add_argument("--share-in-harness", action="store_true",
                   help="share after building when the engine did not (before build_model shares)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the engines to build")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_memory"))
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        print(f"error: model {args.model} not found (run ./build.sh setup)", file=sys.stderr)
        return 2
    rows = []
    for weights in args.formats.split(","):
        for num_prefill, num_decode in args.layouts:
            for shared in (False, True):
                row = measure(args.model, weights, num_prefill, num_decode, shared, args.num_kv_blocks,
                              args.share_in_harness, args.timeout)
                print(json.dumps(asdict(row)), flush=True)
                rows.append(row)
    report = {"command": shlex.join(["python", "-m", "benchmarks.memory", *argv]),
              "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": args.model, "num_kv_blocks": args.num_kv_blocks,
              "rows": [asdict(r) for r in rows], "savings": savings(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
