"""The engine benchmark's summary: tok/s per config and subject, the target ratios, markdown, plot."""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import report as report_files

# Targets (issue 9), each ours-<format> / peer in one run.
TARGET_PREFILL_VS_VLLM = 1.2        # every prefill length
TARGET_DECODE_B1_VS_LLAMACPP = 1.0
TARGET_DECODE_TOP_VS_VLLM = 1.2     # aggregate decode at the largest batch
TARGET_INT4_WEIGHTS_VS_BF16 = 0.35  # resident weight bytes, ours-int4 / ours-bf16 (at most)
LABELS = {"hf": "HF transformers", "vllm": "vLLM-CPU", "llamacpp": "llama.cpp"}


def config_key(kind: str, size: int) -> str:
    return f"decode_b{size}" if kind == "decode" else f"prefill_{size}"


def _stats(times: list[float], tokens_per_step: int) -> dict:
    median = statistics.median(times)
    return {"tok_s": tokens_per_step / median, "median_s": median, "mean_s": statistics.fmean(times),
            "num_samples": len(times), "times_s": times}


def tok_s_table(raw: dict[str, dict[str, list[float]]], tasks: list[tuple[str, int]]) -> dict:
    """raw[config_key][subject] = seconds (per prefill or per decode step) -> {key: {subject: stats}}."""
    table = {}
    for kind, size in tasks:
        key = config_key(kind, size)
        table[key] = {who: _stats(times, size) for who, times in raw.get(key, {}).items() if times}
    return table


def _ratio(name: str, num: float | None, den: float | None, target: float | None, at_most: bool = False) -> dict:
    value = None if not num or not den else num / den
    met = None if value is None or target is None else (value <= target if at_most else value >= target)
    return {"name": name, "value": value, "target": target, "at_most": at_most, "met": met}


def _tok(configs: dict, key: str, who: str) -> float | None:
    return configs.get(key, {}).get(who, {}).get("tok_s")


def target_ratios(configs: dict, infos: dict[str, dict], formats: list[str], batches: list[int],
                  prefill_lens: list[int]) -> list[dict]:
    """The issue's targets for every format of ours, plus ours vs HF (no target) for reference."""
    top = max(batches)
    ratios = []
    for fmt in formats:
        ours = f"ours-{fmt}"
        for n in prefill_lens:
            ratios.append(_ratio(f"{ours} / vLLM-CPU, prefill {n}", _tok(configs, f"prefill_{n}", ours),
                                 _tok(configs, f"prefill_{n}", "vllm"), TARGET_PREFILL_VS_VLLM))
        ratios.append(_ratio(f"{ours} / llama.cpp, decode batch 1", _tok(configs, "decode_b1", ours),
                             _tok(configs, "decode_b1", "llamacpp"), TARGET_DECODE_B1_VS_LLAMACPP))
        ratios.append(_ratio(f"{ours} / vLLM-CPU, decode batch {top} (aggregate)",
                             _tok(configs, f"decode_b{top}", ours), _tok(configs, f"decode_b{top}", "vllm"),
                             TARGET_DECODE_TOP_VS_VLLM))
        ratios.append(_ratio(f"{ours} / HF, decode batch 1", _tok(configs, "decode_b1", ours),
                             _tok(configs, "decode_b1", "hf"), None))
    weight = {who: info.get("weight_bytes") for who, info in infos.items()}
    ratios.append(_ratio("resident weights, ours-int4 / ours-bf16", weight.get("ours-int4"),
                         weight.get("ours-bf16"), TARGET_INT4_WEIGHTS_VS_BF16, at_most=True))
    return ratios


def _fmt_ratio(r: dict) -> list[str]:
    value = "n/a" if r["value"] is None else f"{r['value']:.2f}x"
    target = "-" if r["target"] is None else f"{'<=' if r['at_most'] else '>='} {r['target']:g}x"
    met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
    return [r["name"], value, target, met]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    m, s, subjects = report["machine"], report["settings"], report["subjects"]
    ok = [who for who, sub in subjects.items() if sub.get("error") is None]
    lines = ["# Engine benchmark: ours (per weight format) vs HF transformers, vLLM-CPU, llama.cpp", "",
             f"{m['cpu_model']}; every subject in its own process pinned to core {m['core']}, 1 thread; "
             f"activation dtype {m['dtype']}; {m['timestamp']}, commit {m.get('git_commit', '?')}.", "",
             f"Command: `{m['command']}`", "",
             f"Load average (1/5/15 min) before {m['loadavg_before']}, after {m['loadavg_after']}.", "",
             f"Prefill: one prompt of N random token ids (same ids for every subject), prompt -> first token, "
             f"median of {s['prefill_repeats']} x {s['rounds']} rounds. Decode: a batch of prompts of "
             f"{s['prompt_len']} tokens is prefilled (untimed), then {s['decode_steps']} steps are timed; "
             f"tok/s = batch / median step, over {s['rounds']} rounds. Subjects take turns measurement by "
             "measurement, the order reversed every other turn. Tokens/s, higher is better; raw times in the JSON.", "",
             _row(["config", *ok]), _row(["---", *["---:"] * len(ok)])]
    for key, row in report["configs"].items():
        label = key.replace("decode_b", "decode, batch ").replace("prefill_", "prefill, ")
        lines.append(_row([label, *(f"{row[w]['tok_s']:.1f}" if w in row else "-" for w in ok)]))
    lines += ["", "## Targets", "", _row(["ratio", "value", "target", "met"]), "|---|---:|---|---|"]
    lines += [_row(_fmt_ratio(r)) for r in report["ratios"]]
    lines += ["", "## Subjects", ""]
    for who, sub in subjects.items():
        info = sub.get("info") or {}
        mem = ", ".join(f"{k} {info[k] / 2**20:.0f} MiB" for k in ("weight_bytes", "rss_bytes") if info.get(k))
        if sub.get("error"):
            lines.append(f"- **{who}: skipped** ({sub['error'].splitlines()[0][:300]})")
        else:
            versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "vllm", "llama_cpp_python",
                                                             "weights") if k in info)
            lines.append(f"- {who}: {versions}; {mem}{_usage(sub.get('info_after') or {}, report['machine']['core'])}")
    lines += ["", *report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _usage(after: dict, core: int) -> str:
    """'; CPU/wall 1.00 on [1]', flagged when a subject used more than its one core."""
    if after.get("cpu_per_wall") is None:
        return ""
    cpus = after.get("cpus_of_threads", [])
    text = f"; CPU s / wall s {after['cpu_per_wall']:.2f}, threads on CPUs {cpus}"
    if after["cpu_per_wall"] > 1.1 or cpus != [core]:
        text += " (**more than the one core**)"
    return text


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s, configs = report["settings"], report["configs"]
    fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
    for who, sub in report["subjects"].items():
        if sub.get("error"):
            continue
        label = LABELS.get(who, who)
        for ax, kind, sizes in ((ax_p, "prefill", s["prefill_lens"]), (ax_d, "decode", s["batches"])):
            pts = [(n, configs[config_key(kind, n)][who]["tok_s"]) for n in sizes
                   if who in configs.get(config_key(kind, n), {})]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
    ax_p.set(xscale="log", xlabel="prompt tokens", ylabel="prefill tokens/s", title="Prefill, 1 core")
    ax_d.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s (aggregate)",
             title="Decode, 1 core")
    ax_p.set_xticks(s["prefill_lens"], [str(n) for n in s["prefill_lens"]])
    ax_d.set_xticks(s["batches"], [str(b) for b in s["batches"]])
    for ax in (ax_p, ax_d):
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_d.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    report_files.write_outputs(report, out, markdown, plot, indent=2)
