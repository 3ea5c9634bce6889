"""Does a KV admission stall the running decode batch? Step-time trace, side by side.

    python -m benchmarks.admission [--model PATH] [--prompt-len 2000] [--out docs/bench_admission]

One process pinned to one core (the decode instance's budget on this host), one torch thread.
A prefill engine exports the KV of a long prompt (default 2,000 tokens) over the real shm
transport; a decode worker runs a batch of 8 sequences; mid-run the long request is handed to
it. Two decode workers are traced, one after the other, on the same requests: `async` (the copy
runs on the worker's copy thread beside the steps, the request joins at a step boundary) and
`inline` (the copy runs inside the step, as before asynchronous admission). Reported per mode:
the running sequences' gap between tokens around the admission vs their median gap.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path
from statistics import median

import torch

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.messages import Admitted, DecodeRequest, Prefilled, PrefillRequest, Tokens
from backends.core.sampling import SamplingParams
from backends.core.weights import load_checkpoint
from backends.core.kv_cache import dtype_from_name
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillWorker
from benchmarks import report as report_files
from deploy.deployment import DEFAULT_MODEL_PATH, default_deployment
from kvtransfer import make_exporter, make_importer

BATCH, WARM_STEPS, TRACE_STEPS = 8, 10, 30


def _prefill(prefill: PrefillWorker, reqs: list[PrefillRequest]) -> dict[str, Prefilled]:
    for r in reqs:
        prefill.submit(r)
    out: dict[str, Prefilled] = {}
    while len(out) < len(reqs):
        out.update((m.req_id, m) for _, m in prefill.step())
    return out


def _decode_request(req: PrefillRequest, res: Prefilled) -> DecodeRequest:
    params = SamplingParams(**{**req.params.__dict__, "seed": res.seed})
    return DecodeRequest(req.req_id, req.prompt_ids, res.first_token_id, params, res.kv)


def trace(mode: str, prefill: PrefillWorker, make_decode, vocab: int, prompt_len: int) -> dict:
    rng = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=WARM_STEPS + TRACE_STEPS + 20, temperature=0, ignore_eos=True)
    batch = [PrefillRequest(f"{mode}-b{i}", torch.randint(0, vocab, (128,), generator=rng).tolist(), params)
             for i in range(BATCH)]
    long = PrefillRequest(f"{mode}-long", torch.randint(0, vocab, (prompt_len,), generator=rng).tolist(), params)
    results = _prefill(prefill, batch + [long])
    decode = make_decode(mode)
    try:
        for r in batch:
            decode.submit(_decode_request(r, results[r.req_id]))
        while len(decode.engine.scheduler.running) < BATCH:
            decode.step()
        steps, submitted_at, admitted_at, joined = [], None, None, None
        for i in range(WARM_STEPS + TRACE_STEPS):
            if i == WARM_STEPS:
                submitted_at = time.perf_counter()
                decode.submit(_decode_request(long, results[long.req_id]))
            t0 = time.perf_counter()
            msgs = [m for _, m in decode.step()]
            t1 = time.perf_counter()
            if any(isinstance(m, Admitted) for m in msgs):
                admitted_at, joined = t1, i                 # it decodes in this step already
            running = sum(isinstance(m, Tokens) and not m.req_id.endswith("long") for m in msgs)
            steps.append({"end": t1, "step_s": t1 - t0, "batch_tokens": running,
                          "loading": len(decode.engine.scheduler.loading)})
        for s in steps:
            s["end"] -= submitted_at
        # gap i = the running sequences' wait for their token of step i + 1
        gaps = [b["end"] - a["end"] for a, b in zip(steps, steps[1:])]
        before, after = median(gaps[:WARM_STEPS - 1]), median(gaps[-10:])
        # what the admission added to the running sequences: every gap from the submission to one
        # step after the join, over what it costs without an admission (the batch before the
        # join, the batch with the long sequence after it)
        added = sum(g - (before if i + 1 < joined else after)
                    for i, g in enumerate(gaps) if WARM_STEPS - 1 <= i <= joined)
        return {"steps": steps, "median_gap_before_s": before, "median_gap_after_s": after,
                "added_delay_s": added, "joined_step": joined - WARM_STEPS,
                "admitted_after_s": admitted_at - submitted_at,
                "kv_bytes": decode.kv_bytes, "kv_copy_s": decode.kv_seconds}
    finally:
        for r in batch + [long]:
            decode.cancel(r.req_id)
        decode.step()
        prefill.step()
        decode.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL_PATH)
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument("--cores", default="1", help="cores the process may use, e.g. 1 or 0,1 "
                   "(the step runs one torch thread; a second core lets the copy thread overlap)")
    p.add_argument("--repeats", type=int, default=5, help="traces per mode, alternating; medians")
    p.add_argument("--out", default="docs/bench_admission")
    args = p.parse_args()
    cores = {int(c) for c in args.cores.split(",")}
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(1)
    d = default_deployment(args.model)
    config, sd = load_checkpoint(str(d.resolved_model_path()), dtype_from_name(d.dtype),
                                 keep_quantized=d.weights != "bf16")
    pcfg = EngineConfig(dtype=d.dtype, role="prefill", limits=d.prefill.limits(d.block_size),
                        max_model_len=d.max_model_len, weights=d.weights)
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-bench", lease_timeout_s=600)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-bench")
    dcfg = EngineConfig(dtype=d.dtype, role="decode", limits=d.decode.limits(d.block_size),
                        max_model_len=d.max_model_len, weights=d.weights)
    dengine = LLMEngine(config, sd, dcfg)

    def make_decode(name: str) -> DecodeWorker:
        return DecodeWorker(dengine, make_importer("shm", dengine.kv), f"decode-{name}",
                            async_copy=name.startswith("async"))
    runs: dict[str, list[dict]] = {"inline": [], "async": []}
    try:
        for k in range(args.repeats):
            for m in runs:
                runs[m].append(trace(f"{m}{k}", prefill, make_decode, config.vocab_size, args.prompt_len))
    finally:
        prefill.close()
    keys = ("median_gap_before_s", "median_gap_after_s", "added_delay_s", "admitted_after_s", "kv_copy_s")
    modes = {m: {**{k: median(t[k] for t in ts) for k in keys}, "kv_bytes": ts[0]["kv_bytes"],
                 "added_delay_each_s": [t["added_delay_s"] for t in ts], "steps": ts[0]["steps"]}
             for m, ts in runs.items()}
    report = {"command": f"python -m benchmarks.admission --prompt-len {args.prompt_len} --cores {args.cores} "
                         f"--out {args.out}",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "load_before": os.getloadavg(), "model": args.model, "batch": BATCH,
              "prompt_len": args.prompt_len, "cores": sorted(cores), "repeats": args.repeats, "modes": modes}
    report_files.write_outputs(report, Path(args.out), markdown, plot)
    print(markdown(report))


def markdown(r: dict) -> str:
    rows = [f"Medians of {r['repeats']} traces per mode, alternating.", "",
            "| mode | gap between tokens, before (ms) | after the join (ms) | delay the admission added "
            "to the running batch (ms) | KV copy (ms) | request joined after (ms) |",
            "|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        rows.append(f"| {mode} | {m['median_gap_before_s'] * 1e3:.1f} | {m['median_gap_after_s'] * 1e3:.1f} | "
                    f"{m['added_delay_s'] * 1e3:.1f} | {m['kv_copy_s'] * 1e3:.1f} | "
                    f"{m['admitted_after_s'] * 1e3:.1f} |")
    rows += ["", "Delay added per trace (ms): " + "; ".join(
        f"{mode} " + ", ".join(f"{x * 1e3:.0f}" for x in m["added_delay_each_s"]) for mode, m in r["modes"].items())]
    return (f"# KV admission vs the running decode batch\n\n`{r['command']}` ({r['date']}, load before "
            f"{r['load_before'][0]:.2f}); cores {r['cores']}, one torch thread, batch of {r['batch']} decoding while a "
            f"{r['prompt_len']}-token prompt's KV ({r['modes']['async']['kv_bytes'] / 1e6:.1f} MB) is "
            "handed to the instance.\n\n" + "\n".join(rows) + "\n\nStep-time trace (the first trace of each mode): the .png "
            "beside this file (time 0 = the request reaches the decode worker).\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for mode, m in r["modes"].items():
        ends = [s["end"] * 1e3 for s in m["steps"]]
        gaps = [b - a for a, b in zip(ends, ends[1:])]
        ax.plot(ends[1:], gaps, marker="o", ms=3, label=mode)
    ax.axvline(0, color="grey", ls=":", label="request submitted")
    ax.set_xlabel("time since submission (ms)")
    ax.set_ylabel("gap between tokens (ms)")
    ax.set_title(f"decode batch of {r['batch']} during a {r['prompt_len']}-token KV admission")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
