"""Where one engine step's time goes, on one core: matmul, attention, norm/RoPE/elementwise,
and Python + dispatch (the step's wall time that no aten op accounts for).

    python -m benchmarks.profile_step --model PATH [--weights bf16,auto] [--out docs/profile_step]

Cases: a batch-1 decode step at 32 and 512 tokens of context, a batch-32 decode step at ~160,
and a 512-token prefill. Each
case runs a few warm-up steps, then `--steps` steps under torch.profiler; ops are bucketed by
name (ATTENTION_OPS, MATMUL_OPS; everything else is elementwise/norm/RoPE/copies).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.model_runner import pin_threads
from backends.core.sampling import SamplingParams
from backends.core.weights import load_checkpoint
from benchmarks import report as report_files

MATMUL_OPS = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
              "aten::linear", "aten::matmul", "distserve::quant_linear"}
ATTENTION_OPS = {"aten::bmm", "aten::_softmax", "aten::softmax", "aten::masked_fill_", "aten::index_select",
                 "aten::_index_put_impl_", "aten::index_put_", "aten::stack",
                 "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::baddbmm",
                 "distserve::paged_chunk_attention", "distserve::paged_prefix_attention",
                 "distserve::paged_decode_attention"}
CASES = (("decode", 1, 32), ("decode", 1, 512), ("decode", 32, 160), ("prefill", 1, 512))
PARAMS = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)


def _bucket(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if name in ATTENTION_OPS:
        return "attention"
    return "elementwise"


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(100, 40_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Case:
    """Runs `n` steps of a case: decode steps of one sequence at `context` tokens (its prefill
    runs in `__enter__`, outside any measurement), or 512-token prefills, one per step."""

    def __init__(self, engine: LLMEngine, kind: str, batch: int, context: int) -> None:
        self.engine, self.kind, self.batch, self.context, self.n = engine, kind, batch, context, 0

    def __enter__(self) -> _Case:
        if self.kind == "decode":
            for i in range(self.batch):
                self.engine.add_request(f"p{i}", _prompt(self.context, i), PARAMS)
            while self.engine.scheduler.waiting:
                self.engine.step()
        return self

    def step(self) -> float:
        """One step; its wall time in seconds."""
        if self.kind == "prefill":
            self.n += 1
            self.engine.add_request(f"q{self.n}", _prompt(self.context, self.n), PARAMS)
        t0 = time.perf_counter()
        self.engine.step()
        wall = time.perf_counter() - t0
        if self.kind == "prefill":
            self.engine.abort(f"q{self.n}")
        return wall

    def __exit__(self, *exc) -> None:
        for i in range(self.batch):
            self.engine.abort(f"p{i}")


def profile_case(engine: LLMEngine, kind: str, batch: int, context: int, steps: int) -> dict:
    with _Case(engine, kind, batch, context) as case:
        for _ in range(3):
            case.step()                                         # warm-up
        plain = sorted(case.step() for _ in range(steps))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(case.step() for _ in range(steps))
    buckets = {"matmul": 0.0, "attention": 0.0, "elementwise": 0.0}
    top = []
    for ev in prof.key_averages():
        buckets[_bucket(ev.key)] += ev.self_cpu_time_total / 1e6
        top.append((ev.self_cpu_time_total / 1e6 / steps * 1e3, ev.key, ev.count // steps))
    ms = {k: v / steps * 1e3 for k, v in buckets.items()}
    ms["python_dispatch"] = max(0.0, wall / steps * 1e3 - sum(ms.values()))
    # the profiler's own cost inflates the wall time; the unprofiled median is `step_ms`
    return {"kind": kind, "batch": batch, "context": context, "step_ms": plain[len(plain) // 2] * 1e3,
            "profiled_step_ms": wall / steps * 1e3, "ms": ms,
            "top_ops": [{"op": k, "ms": round(t, 3), "calls": c} for t, k, c in sorted(top, reverse=True)[:12]]}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# One engine step, profiled on one core", "",
             f"{m['cpu_model']}; torch {m['torch']}; 1 thread; load before {m['load_before']}, after "
             f"{m['load_after']}; {m['timestamp']}; `{m['command']}`", "",
             "Buckets are aten self-times per step under torch.profiler; python + dispatch is the profiled "
             "wall time no op accounts for (the profiler inflates it; `step` is the unprofiled median).", "",
             "| weights | case | step (ms) | matmul | attention | norm/RoPE/elementwise | python + dispatch |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        p = r["ms"]
        total = sum(p.values())
        cells = " | ".join(f"{p[k]:.1f} ({100 * p[k] / total:.0f}%)"
                           for k in ("matmul", "attention", "elementwise", "python_dispatch"))
        case = (f"decode batch {r['batch']}, context {r['context']}" if r["kind"] == "decode"
                else f"prefill 1 x {r['context']}")
        lines.append(f"| {r['weights']} | {case} | {r['step_ms']:.1f} | {cells} |")
    lines += ["", "Top ops per step (ms, calls) for each row are in the JSON."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default="bf16,auto", help="comma-separated weight formats")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--core", type=int, default=None)
    p.add_argument("--out", default="docs/profile_step")
    args = p.parse_args(argv)
    core = min(os.sched_getaffinity(0)) if args.core is None else args.core
    pin_threads([core], 1)
    load_before = os.getloadavg()
    config, sd = load_checkpoint(args.model, torch.bfloat16, keep_quantized=True)
    results = []
    for weights in args.weights.split(","):
        for kind, batch, context in CASES:
            role = "prefill" if kind == "prefill" else "both"     # what a prefill instance runs
            engine = LLMEngine(config, sd, EngineConfig(weights=weights, role=role,
                                                        limits=EngineLimits(num_kv_blocks=512,
                                                                            max_num_seqs=64)))
            results.append({"weights": weights, **profile_case(engine, kind, batch, context, args.steps)})
            print(results[-1]["weights"], kind, context, f"{results[-1]['step_ms']:.1f} ms",
                  {k: round(v, 1) for k, v in results[-1]["ms"].items()}, flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    report = {"machine": {"cpu_model": cpu, "torch": torch.__version__, "core": core,
                          "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()],
                          "command": shlex.join(["python", "-m", "benchmarks.profile_step", *argv]),
                          "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "results": results}
    report_files.write_outputs(report, Path(args.out), markdown, None, indent=2)
    print(markdown(report))


if __name__ == "__main__":
    main()
