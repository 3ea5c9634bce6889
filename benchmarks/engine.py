"""Engine benchmark: our engine vs HF transformers (same weights, same dtype) vs the weight-read bound.

    python -m benchmarks.engine --model PATH [--dtype bfloat16] [--out docs/bench_engine] [--quick]

Everything runs on ONE core (process pinned, torch.set_num_threads(1)). For each configuration ours
and HF run side by side, one step each in turn (A B A B ..., the order flipping per configuration),
so machine noise lands on both alike; this repeats for a few rounds. Decode: after the prefill each
decode step is timed; tok/s = batch / median step time. Prefill: one prompt per step; tok/s = prompt
length / median time. Bound: one pass of F.linear over fresh tensors shaped like every weight matmul,
at batch 1, interleaved with the batch-1 decode steps the same way.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks import report as report_files
from backends.core.config import ModelConfig
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.model_runner import DTYPES, pin_threads
from backends.core.sampling import SamplingParams
from backends.core.weights import load_checkpoint

TARGET_VS_HF = 1.5          # ours / HF, batch-1 decode tok/s
TARGET_SCALING = 10.0       # ours, largest-batch aggregate decode tok/s / batch-1
_req_ids = itertools.count()


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 128           # decode runs start from prompts of this length
    decode_steps: int = 32          # timed decode steps per run
    prefill_lens: tuple[int, ...] = (128, 512)
    prefill_repeats: int = 3        # per round
    rounds: int = 3
    block_size: int = 16

    def __post_init__(self) -> None:
        if 1 not in self.batches:
            raise ValueError(f"batches must include 1, got {self.batches}")
        for name in ("prompt_len", "decode_steps", "prefill_repeats", "rounds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


QUICK = Settings(prompt_len=32, decode_steps=4, prefill_lens=(32, 128), prefill_repeats=1, rounds=1)


@dataclass
class Subjects:
    engine: LLMEngine
    hf: torch.nn.Module
    bound: list[tuple[torch.Tensor, torch.Tensor]]     # (x [1, in], weight [out, in]) per matmul
    vocab_size: int
    settings: Settings


# ---------------------------------------------------------------- building the three subjects

def build_ours(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: str, s: Settings) -> LLMEngine:
    blocks_per_seq = -(-(s.prompt_len + s.decode_steps + 1) // s.block_size)
    num_blocks = max(s.batches) * blocks_per_seq + -(-max(s.prefill_lens) // s.block_size) + 1
    return LLMEngine(config, sd, EngineConfig(
        dtype=dtype, block_size=s.block_size, num_kv_blocks=num_blocks, max_num_seqs=max(s.batches),
        max_num_batched_tokens=max(max(s.batches) * s.prompt_len, max(s.prefill_lens))))


def hf_config(config: ModelConfig):
    import transformers

    if config.arch != "llama":
        raise ValueError(f"the HF baseline is LlamaForCausalLM; {config.arch!r} is not a llama")
    scaling = asdict(config.rope_scaling) if config.rope_scaling else {}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **scaling},
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None)


def build_hf(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: str) -> torch.nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM._from_config(hf_config(config), dtype=DTYPES[dtype])
    result = model.load_state_dict(sd, strict=False)     # copies: no storage shared with ours
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"HF model mismatch: missing {sorted(missing)[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def weight_shapes(c: ModelConfig) -> list[tuple[int, int]]:
    """[out, in] of every matmul weight read per decode step: q,k,v,o,gate,up,down per layer, lm_head."""
    d, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    return [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)] * c.num_layers + [(c.vocab_size, d)]


def build_bound(c: ModelConfig, dtype: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dt = DTYPES[dtype]
    xs = {n: torch.randn(1, n, dtype=dt) for n in {shape[1] for shape in weight_shapes(c)}}
    return [(xs[n_in], torch.randn(n_out, n_in, dtype=dt)) for n_out, n_in in weight_shapes(c)]


# ---------------------------------------------------------------- measurements (each yields seconds)

def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prompts(batch: int, length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))


def _add(engine: LLMEngine, prompts: torch.Tensor, max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    req_ids = [f"bench-{next(_req_ids)}" for _ in range(prompts.shape[0])]
    for req_id, ids in zip(req_ids, prompts.tolist()):
        engine.add_request(req_id, ids, params)
    return req_ids


def ours_decode(sub: Subjects, batch: int) -> Iterator[float]:
    s = sub.settings
    req_ids = _add(sub.engine, _prompts(batch, s.prompt_len, sub.vocab_size), s.decode_steps + 1)
    try:
        while sub.engine.scheduler.waiting:
            sub.engine.step()
        for _ in range(s.decode_steps):
            yield _timed(sub.engine.step)
    finally:
        for req_id in req_ids:
            sub.engine.abort(req_id)


def ours_prefill(sub: Subjects, length: int) -> Iterator[float]:
    for _ in range(sub.settings.prefill_repeats):
        (req_id,) = _add(sub.engine, _prompts(1, length, sub.vocab_size), 2)
        try:
            yield _timed(sub.engine.step)
        finally:
            sub.engine.abort(req_id)


@torch.inference_mode()
def hf_decode(sub: Subjects, batch: int) -> Iterator[float]:
    out = sub.hf(_prompts(batch, sub.settings.prompt_len, sub.vocab_size), use_cache=True, logits_to_keep=1)
    for _ in range(sub.settings.decode_steps):
        t0 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)                   # greedy: [B, 1]
        out = sub.hf(tok, cache=out.cache, use_cache=True)
        yield time.perf_counter() - t0


@torch.inference_mode()
def hf_prefill(sub: Subjects, length: int) -> Iterator[float]:
    ids = _prompts(1, length, sub.vocab_size)
    for _ in range(sub.settings.prefill_repeats):
        yield _timed(lambda: sub.hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1))


@torch.inference_mode()
def bound_passes(sub: Subjects, num_passes: int) -> Iterator[float]:
    def one_pass() -> None:
        for x, w in sub.bound:
            F.linear(x, w)
    for _ in range(num_passes):
        yield _timed(one_pass)


def config_key(kind: str, size: int) -> str:
    return f"decode_b{size}" if kind == "decode" else f"prefill_{size}"


RUNNERS = {("decode", "ours"): ours_decode, ("decode", "hf"): hf_decode,
           ("prefill", "ours"): ours_prefill, ("prefill", "hf"): hf_prefill}


def interleave(runs: dict[str, Iterator[float]], raw: dict[str, list[float]], key: str) -> None:
    """Alternate single steps of each run (A B A B ...) so noise hits all alike; append to raw."""
    for times in itertools.zip_longest(*runs.values()):
        for who, t in zip(runs, times):
            if t is not None:
                raw.setdefault("bound" if who == "bound" else f"{key}/{who}", []).append(t)


def measure(sub: Subjects) -> dict[str, list[float]]:
    """Raw seconds per (config, who), keys like 'decode_b8/ours', plus 'bound' (run beside batch-1 decode)."""
    s = sub.settings
    tasks = [("decode", b) for b in s.batches] + [("prefill", n) for n in s.prefill_lens]
    raw: dict[str, list[float]] = {}
    orders = itertools.cycle([("ours", "hf", "bound"), ("bound", "hf", "ours")])
    with tqdm(total=s.rounds * len(tasks), desc="engine bench", unit="config") as bar:
        for _ in range(s.rounds):
            for kind, size in tasks:
                bar.set_postfix_str(config_key(kind, size))
                runs = {who: RUNNERS[kind, who](sub, size) for who in ("ours", "hf")}
                if (kind, size) == ("decode", 1):
                    runs["bound"] = bound_passes(sub, s.decode_steps)
                interleave({who: runs[who] for who in next(orders) if who in runs}, raw, config_key(kind, size))
                bar.update()
    return raw


def warm_up(sub: Subjects) -> None:
    tiny = Subjects(sub.engine, sub.hf, sub.bound, sub.vocab_size,
                    Settings(batches=(1,), prompt_len=16, decode_steps=2, prefill_lens=(16,), prefill_repeats=1))
    for (kind, _), runner in RUNNERS.items():
        list(runner(tiny, 1 if kind == "decode" else 16))
    list(bound_passes(tiny, 1))


# ---------------------------------------------------------------- summary and outputs

def _stats(times: list[float], tokens_per_step: int) -> dict:
    median = statistics.median(times)
    return {"tok_s": tokens_per_step / median, "median_s": median, "times_s": times}


def _ratio(name: str, value: float, target: float | None) -> dict:
    return {"name": name, "value": value, "target": target, "met": None if target is None else value >= target}


def summarize(raw: dict[str, list[float]], s: Settings, config: ModelConfig, dtype: str) -> dict:
    configs = {}
    for kind, tokens in [("decode", b) for b in s.batches] + [("prefill", n) for n in s.prefill_lens]:
        key = config_key(kind, tokens)
        ours, hf = _stats(raw[f"{key}/ours"], tokens), _stats(raw[f"{key}/hf"], tokens)
        configs[key] = {"ours": ours, "hf": hf, "ratio": ours["tok_s"] / hf["tok_s"]}
    weight_bytes = sum(o * i for o, i in weight_shapes(config)) * DTYPES[dtype].itemsize
    bound = {**_stats(raw["bound"], 1), "weight_bytes": weight_bytes}
    bound["gb_s"] = weight_bytes / bound["median_s"] / 1e9
    b1, top = configs["decode_b1"]["ours"]["tok_s"], configs[f"decode_b{max(s.batches)}"]["ours"]["tok_s"]
    ratios = [_ratio("ours / HF, batch-1 decode", configs["decode_b1"]["ratio"], TARGET_VS_HF),
              _ratio(f"ours batch-{max(s.batches)} aggregate / batch-1 decode", top / b1, TARGET_SCALING),
              _ratio("ours batch-1 decode / weight-read bound", b1 / bound["tok_s"], None),
              _ratio("weight-read bound / HF batch-1 decode (ceiling of ours / HF)",
                     bound["tok_s"] / configs["decode_b1"]["hf"]["tok_s"], None)]
    return {"configs": configs, "bound": bound, "ratios": ratios}


def machine_info(dtype: str, core: int, argv: list[str]) -> dict:
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return {"cpu_model": model, "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or "amx" in f),
            "core": core, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": dtype,
            "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.engine", *argv]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = ["# Engine benchmark: ours vs HF transformers (one core each)", "",
             f"{m['cpu_model']}, core {m['core']}, 1 thread, {m['dtype']}, torch {m['torch']}, "
             f"transformers {m['transformers']}; {m['timestamp']}; `{m['command']}`", "",
             f"Decode: prompts of {s['prompt_len']} tokens, median of {s['decode_steps']} steps x {s['rounds']} "
             f"rounds; prefill: one prompt, median of {s['prefill_repeats']} x {s['rounds']} rounds. "
             "Ours and HF interleaved step by step; the bound interleaved with batch-1 decode. "
             "Tokens/s (higher is better). The machine is shared and noisy: raw times are in the JSON.", "",
             "| config | ours (tok/s) | HF (tok/s) | ours / HF |", "|---|---:|---:|---:|"]
    for key, c in report["configs"].items():
        label = key.replace("decode_b", "decode, batch ").replace("prefill_", "prefill, 1 x ")
        lines.append(f"| {label} | {c['ours']['tok_s']:.1f} | {c['hf']['tok_s']:.1f} | {c['ratio']:.2f}x |")
    b = report["bound"]
    lines += ["", f"Weight-read bound (batch 1): {b['tok_s']:.1f} tok/s ({b['median_s'] * 1e3:.2f} ms per pass "
              f"over {b['weight_bytes'] / 1e6:.0f} MB, {b['gb_s']:.1f} GB/s).", "",
              "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for r in report["ratios"]:
        target = "-" if r["target"] is None else f">= {r['target']:g}x"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['name']} | {r['value']:.2f}x | {target} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = report["settings"]["batches"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for who, label in (("ours", "ours"), ("hf", "HF transformers")):
        ax.plot(batches, [report["configs"][f"decode_b{b}"][who]["tok_s"] for b in batches], "o-", label=label)
    ax.plot(batches, [b * report["bound"]["tok_s"] for b in batches], "k--",
            label="weight-read bound (batch / one weight pass)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
           title=f"Decode throughput, 1 core, {report['machine']['dtype']}")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    report_files.write_outputs(report, out, markdown, plot, indent=2)


def run(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: str, s: Settings) -> dict:
    """Build the three subjects, warm up, measure interleaved; return settings + summary + raw times."""
    sub = Subjects(build_ours(config, sd, dtype, s), build_hf(config, sd, dtype), build_bound(config, dtype),
                   config.vocab_size, s)
    warm_up(sub)
    raw = measure(sub)
    return {"settings": asdict(s), "model_config": asdict(config), **summarize(raw, s, config, dtype)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=".gguf file or HF model directory")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--out", default="docs/bench_engine", help="output prefix (.json, .md, .png)")
    p.add_argument("--quick", action="store_true", help="few steps and repeats: a smoke run")
    p.add_argument("--core", type=int, default=None, help="core to pin to (default: the first allowed)")
    args = p.parse_args(argv)
    core = min(os.sched_getaffinity(0)) if args.core is None else args.core
    pin_threads([core], 1)
    config, sd = load_checkpoint(args.model, DTYPES[args.dtype])
    report = run(config, sd, args.dtype, QUICK if args.quick else Settings())
    report = {"machine": machine_info(args.dtype, core, argv), "model": args.model, **report}
    out = Path(args.out)
    write_outputs(report, out)
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
