"""Profile our engine on one core and fit the planner's latency model (DistServe's Appendix A form).

    python -m planner profile [--model PATH] [--dtype bfloat16] [--out docs/profile_cpu.json] [--quick]

The process is pinned to one core with one torch thread (as benchmarks/engine.py), so one
"device" of kind `cpu-core` is one core. Measured, through `LLMEngine.step()` (the same step the
instances run: schedule, forward, sample, update):
- prefill batches over a mix of prompt lengths (16..2048 tokens, single prompts and batches of
  several): each batch is one step, timed `repeats` times in interleaved rounds, median kept;
- decode steps at several batch sizes and per-sequence contexts (uniform and mixed within the
  batch): sequences enter with `add_prefilled` (their KV is not computed: a decode step's cost
  does not depend on the cache's values), one untimed step, then the median of `decode_steps`
  timed steps; the sample's total context is the mean over the timed steps;
- a KV copy between two pools (the shm hand-off's memcpy) at two sizes, for the KV link.
The samples are fitted with `planner.latency.fit_model` and written in planner.latency's FORMAT
(load_profile reads it back); the raw samples, each one's fitted prediction, R^2 and relative
errors, the KV link, the model's KV bytes per token and the command sit beside the entries.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from backends.core.limits import EngineLimits
from backends.core.sampling import SamplingParams
from planner.latency import FORMAT, LatencyModel, LatencyTable, Link, fit_model, model_key

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"      # deploy.deployment.DEFAULT_MODEL_PATH
DEFAULT_OUT = "docs/profile_cpu.json"
QUICK_OUT = "results/profile_cpu_quick.json"      # a smoke run never replaces the real profile
DEVICE = "cpu-core"
PROFILE_KEY = "profile"          # the top-level key beside FORMAT's "entries"


@dataclass(frozen=True)
class Settings:
    """What to measure. Lengths above the model's context are clipped to it."""
    prefill_batches: tuple[tuple[int, ...], ...] = (
        (16,), (32,), (64,), (128,), (256,), (512,), (1024,), (2048,),
        (16,) * 8, (64,) * 4, (128,) * 4, (32, 128, 512), (256, 512), (512, 512), (96, 1024),
        (16, 2048))
    repeats: int = 3                                  # prefill: timed runs per batch
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_contexts: tuple[int, ...] = (32, 256, 1024)   # per-sequence context, uniform batches
    mixed_batches: tuple[int, ...] = (4, 16, 32)     # batches of contexts drawn from [16, max]
    decode_steps: int = 5                             # timed steps per decode batch
    warmup_steps: int = 1                             # untimed steps before them
    kv_copy_tokens: tuple[int, int] = (64, 2048)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("repeats", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.prefill_batches or not (self.decode_batches and self.decode_contexts):
            raise ValueError("need prefill batches, decode batch sizes and decode contexts")

    def clipped(self, max_len: int) -> Settings:
        """Every prompt and context (plus the decode steps) inside a `max_len` context."""
        top = max_len - 1
        dtop = max(1, max_len - self.warmup_steps - self.decode_steps - 2)
        batches = tuple(dict.fromkeys(tuple(min(n, top) for n in b) for b in self.prefill_batches))
        ctxs = tuple(dict.fromkeys(min(c, dtop) for c in self.decode_contexts))
        return replace(self, prefill_batches=batches, decode_contexts=ctxs,
                       kv_copy_tokens=tuple(min(n, top) for n in self.kv_copy_tokens))


QUICK = Settings(prefill_batches=((16,), (64,), (256,), (512,), (16,) * 4, (64, 256), (128, 128)),
                 repeats=2, decode_batches=(1, 4, 8), decode_contexts=(32, 256), mixed_batches=(8,),
                 decode_steps=2)


@dataclass
class Samples:
    prefill: list[dict]             # {"lens", "times_s"}
    decode: list[dict]              # {"batch_size", "ctx", "total_ctx", "times_s"}
    kv_copy: list[dict]             # {"tokens", "bytes", "times_s"}


def decode_batches(s: Settings, max_ctx: int) -> list[list[int]]:
    """Per-sequence contexts of every decode batch: the grid, then the mixed batches (seeded)."""
    rng = np.random.default_rng(s.seed)
    grid = [[c] * b for b in s.decode_batches for c in s.decode_contexts]
    top = max(s.decode_contexts)
    mixed = [sorted(rng.integers(min(16, top), top + 1, b).tolist()) for b in s.mixed_batches]
    return [[min(c, max_ctx) for c in b] for b in grid + mixed]


# ---- measuring through the engine -------------------------------------------------------------

class EngineProbe:
    """Times one engine's steps (the engine's own `step()`, wall clock)."""

    def __init__(self, engine, vocab_size: int, seed: int = 0) -> None:
        self.engine, self.vocab_size = engine, vocab_size
        self.rng = np.random.default_rng(seed)
        self.ids = itertools.count()
        self.block_size = engine.config.limits.block_size

    def _prompt(self, n: int) -> list[int]:
        return self.rng.integers(0, self.vocab_size, n).tolist()

    def _timed_step(self) -> float:
        t0 = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t0

    def prefill(self, lens: Sequence[int]) -> float:
        """One prefill step over prompts of `lens` (each asks for one token, so it finishes)."""
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for n in lens:
            self.engine.add_request(f"prof-{next(self.ids)}", self._prompt(n), params)
        t = self._timed_step()
        batch = self.engine.last_batch
        if batch is None or len(batch.seqs) != len(lens) or self.engine.has_unfinished():
            raise RuntimeError(f"prefill batch {list(lens)} did not run as one step "
                               "(token budget or max_num_seqs too small)")
        return t

    def decode(self, ctxs: Sequence[int], warmup: int, steps: int) -> tuple[list[float], list[int]]:
        """Step times and total contexts (tokens attended per step, as the simulator counts
        them) of a decode batch whose sequences start at contexts `ctxs`."""
        params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0, ignore_eos=True, seed=0)
        req_ids = []
        try:
            for c in ctxs:
                req_id = f"prof-{next(self.ids)}"
                self.engine.add_prefilled(req_id, self._prompt(c), 0, params)
                req_ids.append(req_id)
            admitted = self.engine.admit_remote()       # KV not copied in: the cost is the same
            for seq in admitted:
                self.engine.kv_arrived(seq.req_id)
            if len(admitted) != len(ctxs):
                raise RuntimeError(f"decode batch of {len(ctxs)}: only {len(admitted)} admitted "
                                   "(KV pool or max_num_seqs too small)")
            times, totals = [], []
            for i in range(warmup + steps):
                total = sum(s.num_tokens for s in self.engine.scheduler.running)
                t = self._timed_step()
                if len(self.engine.last_batch.seqs) != len(ctxs):
                    raise RuntimeError(f"decode batch of {len(ctxs)} ran as "
                                       f"{len(self.engine.last_batch.seqs)} (KV pool too small)")
                if i >= warmup:
                    times.append(t)
                    totals.append(total)
            return times, totals
        finally:
            for req_id in req_ids:
                self.engine.abort(req_id)

    def kv_copy(self, num_tokens: int) -> tuple[float, int]:
        """Seconds and bytes to copy one sequence's KV blocks, scattered over this pool, into
        another pool (the shm transport's copy: kvtransfer.blockcopy)."""
        from kvtransfer.blockcopy import block_bytes, copy_blocks
        src = block_bytes(self.engine.kv.data)
        n = min(-(-num_tokens // self.block_size), len(src))
        stride = max(1, len(src) // n)
        dst = np.empty((n, src.shape[1]), dtype=src.dtype)
        t0 = time.perf_counter()
        copy_blocks(src, dst, range(0, n * stride, stride)[:n], range(n))
        return time.perf_counter() - t0, int(dst.nbytes)


def measure(probe: EngineProbe, s: Settings, max_ctx: int, progress: bool = True) -> Samples:
    """Warm up, then prefill rounds (every batch once per round), decode batches, KV copies."""
    from tqdm import tqdm

    batches = decode_batches(s, max_ctx)
    total = 1 + s.repeats * len(s.prefill_batches) + len(batches) + 1
    out = Samples([{"lens": list(b), "times_s": []} for b in s.prefill_batches], [], [])
    with tqdm(total=total, desc="profile", unit="config", disable=not progress) as bar:
        bar.set_postfix_str("warm-up")
        probe.prefill([16])
        probe.prefill([16, 32])
        probe.decode([16, 32], warmup=1, steps=1)
        bar.update()
        for r in range(s.repeats):
            for rec in out.prefill:
                bar.set_postfix_str(f"prefill {rec['lens'][:4]}{'...' if len(rec['lens']) > 4 else ''}"
                                    f" round {r + 1}")
                rec["times_s"].append(probe.prefill(rec["lens"]))
                bar.update()
        for ctxs in batches:
            bar.set_postfix_str(f"decode b{len(ctxs)} ctx {sum(ctxs)}")
            times, totals = probe.decode(ctxs, s.warmup_steps, s.decode_steps)
            out.decode.append({"batch_size": len(ctxs), "ctx": ctxs,
                               "total_ctx": round(statistics.mean(totals)), "times_s": times})
            bar.update()
        bar.set_postfix_str("kv copy")
        for n in s.kv_copy_tokens:
            runs = [probe.kv_copy(n) for _ in range(max(5, s.repeats))]
            out.kv_copy.append({"tokens": n, "bytes": runs[0][1], "times_s": [t for t, _ in runs]})
        bar.update()
    return out


# ---- fitting and the report ---------------------------------------------------------------

def _quality(measured: Sequence[float], predicted: Sequence[float]) -> dict:
    y, p = np.asarray(measured), np.asarray(predicted)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    rel = np.abs(p - y) / y
    return {"r2": 1.0 - float(((y - p) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0,
            "median_rel_err": float(np.median(rel)), "max_rel_err": float(rel.max()),
            "num_samples": int(len(y))}


def fit_link(kv_copy: Sequence[dict]) -> Link:
    """latency + bytes / bandwidth through the two copy sizes' medians."""
    pts = sorted((r["bytes"], statistics.median(r["times_s"])) for r in kv_copy)
    (b0, t0), (b1, t1) = pts[0], pts[-1]
    slope = (t1 - t0) / (b1 - b0) if b1 > b0 and t1 > t0 else t1 / b1
    return Link(1.0 / slope, max(0.0, t0 - b0 * slope))


def fit(samples: Samples, model: str, device: str = DEVICE, threshold: int = 95
        ) -> tuple[LatencyModel, dict]:
    """The latency model, and the samples annotated with medians, predictions and errors."""
    pre = [(r["lens"], statistics.median(r["times_s"])) for r in samples.prefill]
    dec = [(r["batch_size"], r["total_ctx"], statistics.median(r["times_s"])) for r in samples.decode]
    lat = fit_model(pre, dec, model=model, device=device, threshold=threshold)
    pre_pred = [lat.prefill_time(lens) for lens, _ in pre]
    dec_pred = [lat.decode_time(b, ctx) for b, ctx, _ in dec]
    annotated = {
        "prefill": [{**r, "median_s": t, "predicted_s": p, "rel_err": (p - t) / t}
                    for r, (_, t), p in zip(samples.prefill, pre, pre_pred)],
        "decode": [{**r, "median_s": t, "predicted_s": p, "rel_err": (p - t) / t}
                   for r, (_, _, t), p in zip(samples.decode, dec, dec_pred)],
        "kv_copy": [{**r, "median_s": statistics.median(r["times_s"])} for r in samples.kv_copy]}
    quality = {"prefill": _quality([t for *_, t in pre], pre_pred),
               "decode": _quality([t for *_, t in dec], dec_pred)}
    return lat, {"fit": quality, "samples": annotated}


def model_name(path: str | os.PathLike) -> str:
    """The model key a profile files its coefficients under: the file (or folder) name."""
    name = Path(path).name
    return model_key(name[:-5] if name.lower().endswith(".gguf") else name)


def display_path(path: str | os.PathLike) -> str:
    """Relative to the repository when inside it (so the JSON is the same on every checkout)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def run(config, state_dict, *, model_path: str, dtype: str = "bfloat16", block_size: int = 16,
        settings: Settings = Settings(), device: str = DEVICE, threshold: int = 95,
        progress: bool = True, kv_dtype: str = "auto", weights: str = "auto") -> dict:
    """Profile an engine built from (config, state_dict) in this process; the profile document.
    `kv_dtype` (EngineConfig's): the KV cache's dtype, which sets the decode step's attention
    cost and the KV bytes each token takes (int8: its scales included)."""
    from backends.core.engine import EngineConfig, LLMEngine

    s = settings.clipped(config.max_position_embeddings)
    batches = decode_batches(s, config.max_position_embeddings)
    steps = s.warmup_steps + s.decode_steps + 2
    need = max(sum(-(-(c + steps) // block_size) for c in b) for b in batches)
    limits = EngineLimits(need + 8, max(max(len(b) for b in batches), max(len(b) for b in s.prefill_batches)),
                          max(sum(b) for b in s.prefill_batches), block_size)
    engine = LLMEngine(config, state_dict, EngineConfig(dtype=dtype, kv_dtype=kv_dtype, weights=weights,
                                                        limits=limits))
    t0 = time.perf_counter()
    samples = measure(EngineProbe(engine, config.vocab_size, s.seed), s,
                      config.max_position_embeddings, progress)
    key = model_name(model_path)
    lat, details = fit(samples, key, device, threshold)
    link = fit_link(samples.kv_copy)
    layout = engine.kv.layout
    info = {"model_path": display_path(model_path), "model": key, "device": device, "dtype": dtype,
            "kv_dtype": layout.dtype, "weights": weights, "block_size": block_size, "tp": 1,
            "kv_bytes_per_token": layout.token_nbytes,
            "kv_link": asdict(link), "settings": asdict(s), "duration_s": time.perf_counter() - t0,
            **details}
    return {**json_doc(LatencyTable([lat])), PROFILE_KEY: info}


def json_doc(table: LatencyTable) -> dict:
    return json.loads(table.to_json())


def profile_info(path: str | os.PathLike) -> dict:
    """What a profile file says beside its coefficients ({} for files without it, e.g. A100)."""
    data = json.loads(Path(path).read_text())
    return data.get(PROFILE_KEY, {}) if isinstance(data, dict) and data.get("format") == FORMAT else {}


def summary(doc: dict) -> str:
    info, e = doc[PROFILE_KEY], doc["entries"][0]
    q = info["fit"]
    ms = lambda c: ", ".join(f"{v:.4g}" for v in c)     # noqa: E731
    lines = [f"{info['model']} on one {info['device']} ({info['dtype']}, {info['kv_dtype']} KV), "
             f"{info['duration_s']:.0f} s",
             f"prefill  T = a + b*sum(l) + c*sum(l^2): [{ms(e['prefill'])}] s; "
             f"R^2 {q['prefill']['r2']:.4f}, median |err| {100 * q['prefill']['median_rel_err']:.1f}%, "
             f"max {100 * q['prefill']['max_rel_err']:.1f}%",
             f"decode   T = a + b*sum(ctx) + c*B:     [{ms(e['decode_small'])}] s (B < "
             f"{e['decode_threshold']}); R^2 {q['decode']['r2']:.4f}, median |err| "
             f"{100 * q['decode']['median_rel_err']:.1f}%, max {100 * q['decode']['max_rel_err']:.1f}%",
             f"kv copy  {info['kv_link']['bandwidth_Bps'] / 1e9:.2f} GB/s + "
             f"{info['kv_link']['latency_s'] * 1e6:.0f} us; {info['kv_bytes_per_token']} bytes/token"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=".gguf file or HF model directory")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--weights", default="auto", choices=("auto", "bf16", "int8", "int4"),
                   help="weight format (EngineConfig.weights); auto: one engine of role 'both', so "
                        "prefill batches take the dense GEMM and small decode steps the int4 kernel")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "bfloat16", "float32", "int8"),
                   help="the KV cache's dtype (auto: --dtype); int8 holds ~1.9x the tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--out", default=None, help=f"coefficients JSON with the raw samples (default "
                                                 f"{DEFAULT_OUT}; with --quick {QUICK_OUT})")
    p.add_argument("--quick", action="store_true", help="few, short configurations (a smoke run)")
    p.add_argument("--core", type=int, default=None, help="core to pin to (default: the first allowed)")
    p.add_argument("--device", default=DEVICE, help="device kind the coefficients are filed under")
    p.add_argument("--threshold", type=int, default=None,
                   help="decode batch-size threshold between the two fits (default: where the "
                        "engine switches kernels with --weights auto: 3 on our int4 kernel, whose "
                        "steps of 3 or more rows run on the AMX tiles, 5 on torch's, whose steps of "
                        "more than 4 rows leave it for the dense GEMM; else 95)")
    p.add_argument("--no-progress", action="store_true")


def decode_threshold(weights: str, dtype: str = "bfloat16") -> int:
    """The batch size where the engine's decode step changes kernels (the fit's regime split):
    with weights auto on our int4 kernel, 3 (1-2 rows run int16 dot products, 3-64 the AMX
    tiles); on torch's int4 kernel 5 (past 4 rows the dense GEMM); else 95."""
    from backends.core.model_runner import DTYPES
    from backends.core.quant import INT4_MAX_ROWS_PACKED, native_int4_enabled
    if weights != "auto":
        return 95
    return 3 if native_int4_enabled(DTYPES[dtype]) else INT4_MAX_ROWS_PACKED + 1


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from backends.core.model_runner import DTYPES, pin_threads
    from backends.core.weights import load_checkpoint

    core = min(os.sched_getaffinity(0)) if args.core is None else args.core
    pin_threads([core], 1)
    model = Path(args.model) if Path(args.model).is_absolute() else ROOT / args.model
    config, sd = load_checkpoint(model, DTYPES[args.dtype], keep_quantized=args.weights != "bf16")
    load_before = os.getloadavg()         # the machine may be shared: what else was running
    doc = run(config, sd, model_path=str(model), dtype=args.dtype, block_size=args.block_size,
              settings=QUICK if args.quick else Settings(), device=args.device,
              threshold=args.threshold or decode_threshold(args.weights, args.dtype),
              progress=not args.no_progress, kv_dtype=args.kv_dtype,
              weights=args.weights)
    doc[PROFILE_KEY].update(machine(core), load_avg_before=load_before, load_avg_after=os.getloadavg(),
                            command=shlex.join(["python", "-m", "planner", *argv]))
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(doc) + "\n")
    print(summary(doc))
    print(f"wrote {out}")
    return 0


def dumps(doc: dict) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[[-0-9.e,\s]*\]", lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[")
                  .replace(" ]", "]"), text)


def cpu_model() -> str:
    """This host's CPU as /proc/cpuinfo names it ("?" where it does not)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                 if ln.startswith("model name")), "?")


def machine(core: int) -> dict:
    import torch
    return {"machine": {"cpu_model": cpu_model(), "core": core, "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


if __name__ == "__main__":      # python -m planner.profile works too
    ap = argparse.ArgumentParser(prog="python -m planner.profile")
    add_arguments(ap)
    sys.exit(main(ap.parse_args(), ["profile", *sys.argv[1:]]))
