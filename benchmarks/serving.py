"""Serving benchmark: TPOT through Triton vs the same engine in-process, and the KV hand-off.

    python -m benchmarks.serving [--model PATH] [--quick] [--out docs/bench_serving]

Default deployment (bf16, prefill core 0, decode core 1). Per batch size B, round by round: B gRPC streams (client on
core 0) vs the same LLMEngine stepped directly on core 1 by a child leading its own session like tritonserver (under
load a child in this shell's session got 30-40% less of core 1: autogroups). Then KV hand-off, descriptors, CPU use.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from statistics import median
from typing import Any

import psutil
import torch
from tqdm import tqdm

from benchmarks import report as report_files
from backends.core.control import send
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.model_runner import DTYPES
from backends.core.sampling import SamplingParams
from backends.core.weights import load_checkpoint
from backends.orchestrator.health import phase_of
from client import DistServeClient
from deploy.contract import instance_model
from deploy.deployment import DEFAULT_MODEL_PATH, default_deployment
from deploy.render import render_repository

TARGET_OVERHEAD = 0.05      # Triton TPOT / in-process TPOT - 1
TARGET_KV_SHARE = 0.01      # KV copy / e2e of the worst request with the longest prompt
CLIENT_CORE, DECODE_CORE, INSTANCES = 0, 1, ("prefill-0", "decode-0")
# Triton's instance names (a stub's last argument but one): `<model>_0_0`
STUBS = {f"{instance_model(i)}_0_0": f"{phase_of(i)} stub" for i in INSTANCES} | {"distserve_0_0": "orchestrator stub"}


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    output_len: int = 64
    kv_prompt_lens: tuple[int, ...] = (128, 512)
    kv_repeats: int = 4
    rounds: int = 6

    def __post_init__(self) -> None:
        if min(self.prompt_len, self.kv_repeats, self.rounds, *self.batches, *self.kv_prompt_lens) <= 0 \
                or self.output_len < 3:
            raise ValueError(f"counts must be > 0 and output_len >= 3 (two decode gaps): {self}")


QUICK = Settings(output_len=16, kv_repeats=1, rounds=1)


def steady_gaps(streams: list[list[list[float]]]) -> tuple[list[float], bool]:
    """Per-token gaps (s) between token chunks while all streams decode (every gap if they never all
    did), and whether they did. streams: [arrival_s, num_tokens] per token chunk, on one clock. Chunk 0 is
    prefill's token, chunk 1 decode's first (its gap spans the hand-off), so gaps start after chunk 1."""
    start, end = max(s[1][0] for s in streams), min(s[-1][0] for s in streams)
    return [(b[0] - a[0]) / b[1] for s in streams for a, b in zip(s[1:], s[2:])
            if start >= end or (a[0] >= start and b[0] <= end)], start < end


def tpot_summary(inproc: list[dict], triton: list[dict], cpu_inproc: list[dict], cpu_triton: list[dict]) -> dict:
    """Per round: inproc {"step_s": [...], ...}; triton, a list of streams; cpu_*, CPU seconds by process."""
    gaps, concurrent = zip(*(steady_gaps([s["chunks"] for s in r]) for r in triton))
    ours, theirs = median([t for r in inproc for t in r["step_s"]]), median([g for r in gaps for g in r])
    server = median([s["timing"]["tpot_s"] for r in triton for s in r])
    paired = [median(g) / median(i["step_s"]) - 1 for i, g in zip(inproc, gaps)]
    other = [[i["other processes"], t["other processes"]] for i, t in zip(cpu_inproc, cpu_triton)]     # noise
    return {"inproc_s": ours, "triton_s": theirs, "server_tpot_s": server, "overhead": theirs / ours - 1,
            "overhead_paired": median(paired), "overhead_server_tpot": server / ours - 1,
            "met": theirs / ours - 1 < TARGET_OVERHEAD, "overhead_per_round": paired,
            "num_triton_gaps": sum(map(len, gaps)), "all_decoding_at_once": list(concurrent), "other_cpu_s": other,
            "overhead_quietest_round": min(zip(map(sum, other), paired))[1]}


def kv_summary(timings: list[dict]) -> dict:
    rows = [{"kv_bytes": t["kv_bytes"], "kv_transfer_s": t["kv_transfer_s"], "e2e_s": t["e2e_s"],
             "gb_s": t["kv_bytes"] / t["kv_transfer_s"] / 1e9, "share": t["kv_transfer_s"] / t["e2e_s"],
             "handoff_s": t["decode_admitted_at"] - t["first_token_at"],
             "handoff_share": (t["decode_admitted_at"] - t["first_token_at"]) / t["e2e_s"]} for t in timings]
    return {**{k: median([r[k] for r in rows]) for k in rows[0]}, "max_share": max(r["share"] for r in rows)}


def cpu_ms_per_token(raw: dict, s: Settings, b: int) -> dict[str, float]:
    """CPU ms per decode token, by process, in Triton rounds; and the in-process engine's decode steps."""
    tokens, deltas = s.rounds * b * (s.output_len - 1), raw["cpu"][f"triton_b{b}"]
    out = {k: 1e3 * sum(d[k] for d in deltas) / tokens for k in deltas[0]}
    inproc = sum(sum(r["step_cpu_s"]) for r in raw["inproc"][f"b{b}"])
    return {**out, "in-process engine (decode steps)": 1e3 * inproc / tokens}


def summarize(raw: dict, s: Settings) -> dict:
    kv = {f"p{n}": kv_summary(raw["kv"][f"p{n}"]) for n in s.kv_prompt_lens}
    tpot = {f"b{b}": tpot_summary(raw["inproc"][f"b{b}"], raw["triton"][f"b{b}"], raw["cpu"][f"inproc_b{b}"],
                                  raw["cpu"][f"triton_b{b}"]) for b in s.batches}
    return {"tpot": tpot, "kv": kv, "kv_met": kv[f"p{max(s.kv_prompt_lens)}"]["max_share"] < TARGET_KV_SHARE,
            "descriptor": raw["descriptor"], "kv_blocks_used_after": raw["kv_blocks_used_after"],
            "cpu_ms_per_token": {f"b{b}": cpu_ms_per_token(raw, s, b) for b in s.batches}}


def prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    return torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def inproc_steps(engine: LLMEngine, batch: list[list[int]], output_len: int) -> dict:
    """Prefill `batch`, then time (wall and thread CPU) every decode step until all are done."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for ids in batch:
        engine.add_request(f"inproc-{uuid.uuid4().hex}", ids, params)
    out: dict[str, list[float]] = {"step_s": [], "step_cpu_s": []}
    while engine.scheduler.waiting:
        engine.step()
    while engine.has_unfinished():
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        out["step_s"].append(time.perf_counter() - t0)
        out["step_cpu_s"].append(time.thread_time() - c0)
    return out


def engine_worker(conn: Connection, model: str) -> None:
    """The in-process subject: own session, core 1, one thread; answers (batch, output_len) jobs until None."""
    os.setsid()
    os.sched_setaffinity(0, {DECODE_CORE})
    torch.set_num_threads(1)
    d = default_deployment(model)                        # the decode instance's engine limits
    config = EngineConfig(dtype=d.dtype, limits=d.decode.limits(d.block_size), max_model_len=d.max_model_len)
    engine = LLMEngine(*load_checkpoint(str(d.resolved_model_path()), DTYPES[d.dtype]), config)
    inproc_steps(engine, prompts(8, 128, engine.model_config.vocab_size, seed=0), 4)        # warm-up
    conn.send(engine.model_config.vocab_size)
    while (job := conn.recv()) is not None:
        conn.send(inproc_steps(engine, *job))


def one_stream(url: str, ids: list[int], output_len: int, barrier: threading.Barrier, origin: float) -> dict:
    client = DistServeClient(url, "grpc", timeout=600)
    barrier.wait()
    stream = client.stream(input_ids=ids, max_tokens=output_len, ignore_eos=True,
                           return_token_ids=True, return_timing=True)
    chunks = [[time.perf_counter() - origin, len(c.token_ids)] for c in stream if c.token_ids]
    if sum(n for _, n in chunks) != output_len or stream.timing is None:
        raise RuntimeError(f"stream gave {sum(n for _, n in chunks)} of {output_len} tokens ({stream.finish_reason})")
    return {"chunks": chunks, "timing": stream.timing.to_dict()}


def triton_round(server: Any, batch: list[list[int]], output_len: int) -> list[dict]:
    barrier, origin = threading.Barrier(len(batch)), time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        return list(pool.map(lambda ids: one_stream(server.grpc_url, ids, output_len, barrier, origin), batch))


def instance_stats(server: Any, instance: str, message: dict | None = None) -> dict:
    return send(server.control_dir / str(server.process.pid) / f"{instance}.sock", message or {"op": "stats"})


def cpu_seconds(server: Any, worker_pid: int) -> dict[str, float]:
    """CPU seconds so far (user + system) of each of our processes, and of all the others together."""
    root = psutil.Process(server.process.pid)
    procs = {"tritonserver": root, "benchmark client": psutil.Process(),
             "in-process worker": psutil.Process(worker_pid)}
    procs.update({name: c for c in root.children(recursive=True) for k, name in STUBS.items() if k in c.cmdline()})
    ours, t = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}, psutil.cpu_times()
    return {**ours, "other processes": t.user + t.nice + t.system + t.irq + t.softirq - sum(ours.values())}


def descriptor_sizes(server: Any, ids: list[int]) -> dict:
    """Call prefill directly (as the orchestrator does), measure its messages, cancel the lease."""
    from tests.integration.conftest import http_post
    req_id, params = f"bench-desc-{uuid.uuid4().hex}", {"max_tokens": 8, "temperature": 0.0, "seed": 1}
    status, text = http_post(server.http_url, f"/v2/models/{instance_model(INSTANCES[0])}/infer", {"inputs": [{
        "name": "request", "datatype": "BYTES", "shape": [1],
        "data": [json.dumps({"type": "prefill", "req_id": req_id, "prompt_ids": ids, "params": params})]}]})
    if status != 200:
        raise RuntimeError(f"prefill call failed ({status}): {text}")
    result = json.loads(message := json.loads(text)["outputs"][0]["data"][0])
    instance_stats(server, "prefill-0", {"op": "cancel", "req_id": req_id})
    return {"prompt_tokens": len(ids), "num_blocks": len(result["kv"]["block_ids"]),
            "descriptor_bytes": len(json.dumps(result["kv"], separators=(",", ":")).encode()),
            "prefill_result_bytes": len(message.encode())}


def measure_tpot(server: Any, worker: Any, conn: Connection, s: Settings, raw: dict, bar: tqdm) -> None:
    for r in range(s.rounds):
        for i, b in enumerate(s.batches):
            batch = prompts(b, s.prompt_len, raw["vocab_size"], seed=1000 * (r + 1) + b)
            for who in ("inproc", "triton")[::1 if (r + i) % 2 == 0 else -1]:
                bar.set_postfix_str(f"round {r + 1}: {who}, B={b}")
                before = cpu_seconds(server, worker.pid)
                if who == "inproc":
                    conn.send((batch, s.output_len))
                run = conn.recv() if who == "inproc" else triton_round(server, batch, s.output_len)
                after = cpu_seconds(server, worker.pid)
                raw[who].setdefault(f"b{b}", []).append(run)
                raw["cpu"].setdefault(f"{who}_b{b}", []).append({k: after[k] - before[k] for k in after})
                bar.update()


def measure(server: Any, worker: Any, conn: Connection, s: Settings) -> dict:
    vocab = conn.recv()                                  # the worker is ready
    raw: dict[str, Any] = {"vocab_size": vocab, "inproc": {}, "triton": {}, "cpu": {}, "kv": {}}
    with tqdm(total=2 + 2 * s.rounds * len(s.batches) + s.kv_repeats * len(s.kv_prompt_lens), desc="phases") as bar:
        triton_round(server, prompts(max(s.batches), s.prompt_len, vocab, seed=0), 4)          # warm-up
        bar.update()
        measure_tpot(server, worker, conn, s, raw, bar)
        for rep in range(s.kv_repeats):
            for n in s.kv_prompt_lens:
                run = triton_round(server, prompts(1, n, vocab, seed=7 * rep + n), s.output_len)
                raw["kv"].setdefault(f"p{n}", []).append(run[0]["timing"])
                bar.update()
        raw["descriptor"] = {f"p{n}": descriptor_sizes(server, prompts(1, n, vocab, seed=n)[0])
                             for n in s.kv_prompt_lens}
        time.sleep(1.0)                                  # a cancelled lease is freed on prefill's next step
        raw["kv_blocks_used_after"] = {i: instance_stats(server, i)["kv_blocks_used"] for i in INSTANCES}
        bar.update()
    return raw


def run(model: str, s: Settings) -> dict:
    from tests.integration.conftest import start_server
    deployment, ctx = default_deployment(model), multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    worker = ctx.Process(target=engine_worker, args=(child_conn, model), daemon=True)
    worker.start()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        repo = render_repository(deployment, Path(tmp) / "model_repository", require_code=True)
        with start_server(repo, run_dir=Path(tmp) / "run") as server:   # started with all cores allowed
            os.sched_setaffinity(0, {CLIENT_CORE})                      # the client and the threads it starts
            raw = measure(server, worker, conn, s)
    conn.send(None)
    worker.join()
    return {"settings": asdict(s), "deployment": deployment.to_dict(), **summarize(raw, s), "raw": raw}


def machine_info(argv: list[str]) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    return {"cpu_model": model, "num_cores": os.cpu_count(), "torch": torch.__version__, "loadavg": os.getloadavg(),
            "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.serving", *argv]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def _tpot_md(r: dict) -> str:
    s, cpu = r["settings"], r["cpu_ms_per_token"]
    out = (f"## TPOT, Triton vs in-process (target: overhead < {TARGET_OVERHEAD:.0%})\n\nB gRPC streams at once, "
           f"{s['prompt_len']}-token prompts, {s['output_len']} tokens, {s['rounds']} rounds alternating with the "
           "engine stepped in-process on core 1. In-process: median decode step. Triton: median client per-token "
           "gap while all B decode; paired: median of per-round overheads; server tpot_s: median per request, first "
           "to last token (adds hand-off, ramp-up). CPU ms per decode token: in-process steps; decode stub (engine, "
           "JSON + IPC per sequence, metrics IPCs per step); the rest: tritonserver, orchestrator, client.\n\n"
           + _row("batch", "in-process ms", "Triton ms", "overhead", "paired", "server tpot_s ms", "overhead",
                         "CPU in-process", "CPU decode stub", "CPU rest", "met") + "|---" * 11 + "|\n")
    for key, t in r["tpot"].items():
        rest = sum(v for k, v in cpu[key].items() if k in ("tritonserver", "orchestrator stub", "benchmark client"))
        out += _row(key[1:], f"{t['inproc_s'] * 1e3:.1f}", f"{t['triton_s'] * 1e3:.1f}", f"{t['overhead']:+.1%}",
                    f"{t['overhead_paired']:+.1%}", f"{t['server_tpot_s'] * 1e3:.1f}",
                    f"{t['overhead_server_tpot']:+.1%}", f"{cpu[key]['in-process engine (decode steps)']:.2f}",
                    f"{cpu[key]['decode stub']:.2f}", f"{rest:.2f}", "yes" if t["met"] else "**no**")
    return out + "".join(f"\nB={k[1:]}, overhead per round (CPU s other processes took during its in-process, Triton "
                         "run): " + ", ".join(f"{x:+.1%} ({a:.1f}, {b:.1f})" for x, (a, b) in zip(
                             t["overhead_per_round"], t["other_cpu_s"])) + f"; in the quietest round: "
                         f"{t['overhead_quietest_round']:+.1%}; all B decoding at once: {t['all_decoding_at_once']}.\n"
                         for k, t in r["tpot"].items())


def _kv_md(r: dict) -> str:
    s = r["settings"]
    out = (f"## KV hand-off (target: copy < {TARGET_KV_SHARE:.0%} of e2e, worst {max(s['kv_prompt_lens'])}-token "
           f"request): {'met' if r['kv_met'] else '**not met**'}\n\nOne request at a time, {s['output_len']} tokens, "
           f"{s['kv_repeats']} per length; medians. Copy: decode's memcpy from the prefill pool (kv_transfer_s). "
           "Hand-off: first token sent -> KV admitted on decode (adds the descriptor's BLS trip and the wait for a "
           "step boundary).\n\n" + _row("prompt", "KV MB", "copy ms", "GB/s", "copy / e2e", "worst", "hand-off ms",
                                         "hand-off / e2e", "e2e s") + "|---" * 9 + "|\n")
    for key, k in r["kv"].items():
        out += _row(key[1:], f"{k['kv_bytes'] / 1e6:.2f}", f"{k['kv_transfer_s'] * 1e3:.2f}", f"{k['gb_s']:.1f}",
                    f"{k['share']:.3%}", f"{k['max_share']:.3%}", f"{k['handoff_s'] * 1e3:.1f}",
                    f"{k['handoff_share']:.2%}", f"{k['e2e_s']:.2f}")
    sizes = [f"{v['prompt_tokens']}-token prompt: descriptor {v['descriptor_bytes']} B ({v['num_blocks']} blocks), "
             f"prefill's whole answer {v['prefill_result_bytes']} B" for v in r["descriptor"].values()]
    return out + "\n" + "; ".join(sizes) + f". KV blocks in use after the run: {r['kv_blocks_used_after']}.\n"


def markdown(r: dict) -> str:
    m = r["machine"]
    return (f"# Serving benchmark: the Triton path vs the engine in-process; the KV hand-off\n\n{m['cpu_model']}, "
            f"{m['num_cores']} cores, {r['deployment']['dtype']}, default deployment (prefill core 0, decode core 1), "
            f"torch {m['torch']}; {m['timestamp']}. Shared, noisy machine (load average {m['loadavg'][0]:.2f} at "
            f"start). Raw numbers, CPU by process: the JSON. Rerun: `{m['command']}`\n\n{_tpot_md(r)}\n{_kv_md(r)}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    tpot, kv, w = report["tpot"], report["kv"], 0.27
    for j, (field, label) in enumerate((("inproc_s", "in-process"), ("triton_s", "Triton, client gaps"),
                                        ("server_tpot_s", "Triton, server tpot_s"))):
        left.bar([i + (j - 1) * w for i in range(len(tpot))], [t[field] * 1e3 for t in tpot.values()], w, label=label)
    left.set(xticks=range(len(tpot)), xticklabels=[f"B={k[1:]}" for k in tpot], ylabel="ms", title="TPOT", ymargin=0.35)
    for j, (field, label) in enumerate((("share", "KV copy"), ("handoff_share", "whole hand-off"))):
        right.bar([i + (j - 0.5) * w for i in range(len(kv))], [100 * k[field] for k in kv.values()], w, label=label)
    right.axhline(100 * TARGET_KV_SHARE, color="k", ls="--", label="target (copy)")
    right.set(xticks=range(len(kv)), xticklabels=[f"{k[1:]}-token prompt" for k in kv], yscale="log",
              ylabel="% of end-to-end latency", title="KV hand-off share (median)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    report_files.write_outputs(report, out, markdown, plot, indent=1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL_PATH, help=".gguf file or HF model directory")
    p.add_argument("--out", default="docs/bench_serving", help="output prefix (.json, .md, .png)")
    p.add_argument("--quick", action="store_true", help="one short round: a smoke run")
    args = p.parse_args(argv)
    report = {"machine": machine_info(argv), **run(args.model, QUICK if args.quick else Settings())}
    write_outputs(report, Path(args.out))
    print(markdown(report) + f"\nwrote {Path(args.out).with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
