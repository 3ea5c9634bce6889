"""Paper check: the planner on the published A100 coefficients, beside the DistServe paper.

    python -m planner.paper_check [--workloads chatbot,chatbot-history] [--workers N] [--quick]
                                  [--out docs/planner_paper_check]

OPT-13B on 4 nodes x 8 A100-80GB (NVLink in a node, 25 Gbps between), the chatbot SLOs (TTFT
0.25 s, TPOT 0.1 s, 90% attainment), DistServe's coefficients for the disaggregated plans. Per
workload (lengths from client/bench, counted with SmolLM2's tokenizer, not OPT's):
1. the search (both placement algorithms), timed: the chosen placement and its goodput per GPU;
2. the colocated baselines: vLLM's coefficients (the paper's baseline, from the same artifact)
   and DistServe's own run colocated (same kernels, only the scheduling differs), best tp;
3. the paper's Table 3 placement (prefill TP2, decode TP1, pp 1) evaluated the same way;
4. every phase configuration's goodput, the table behind the choice;
5. long-window re-measures (16 request lifetimes) of 1-3, and the probe design's accuracy: the
   old probe (30 s of arrivals from an empty system, all counted) vs 4 and 16 lifetimes.
Then the paper's motivation figure (512 in / 64 out on one A100). --quick: 1-3 only.
Writes OUT.json (everything) and OUT.md (tables).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from planner.latency import KV_BYTES_PER_TOKEN, LatencyTable, anchor_path, load_kv_capacity, load_profile
from planner.placement import plan_colocated, plan_fixed, plan_high, plan_low
from planner.search import (SLO, Cluster, Placement, Planner, SearchSpace, decode_fluid_rate,
                            goodput, make_probe)
from planner.simulator import SimConfig

MODEL, DEVICE = "opt-13b", "a100-80gb"
CHATBOT_SLO = SLO(0.25, 0.1, 0.9)
MOTIVATION_SLO = SLO(0.4, 0.04, 0.9)     # our reading of the paper's Figure 1 (not in the anchors)
LONG_WINDOW = 16.0                       # lifetimes, for the re-measures
PAPER = {"table3": "prefill TP2 PP1, decode TP1 PP1 (OPT-13B)", "chatbot_gain": [2.0, 4.6],
         "motivation_rps": {"colocated": 1.6, "prefill_only": 5.6, "decode_only": 10.0,
                            "disaggregated_per_gpu": 3.3}}
# The search before this change, same command, same machine (shared: wall time varies with load).
BEFORE = {"commit": "8110768", "command": "nice -n 19 python -m planner plan --ttft 0.25 --tpot 0.1 "
          "--devices 4x8 --no-baseline", "search_s": 173.7, "cpu_s": 72.9, "num_sims": 114,
          "note": "load average ~2.5-3 from other work; 86.9 s wall in a quieter moment"}


def _tables() -> tuple[LatencyTable, LatencyTable, dict]:
    return (load_profile(anchor_path("distserve-a100-profile.distserve.json"), DEVICE),
            load_profile(anchor_path("distserve-a100-profile.vllm.json"), DEVICE),
            load_kv_capacity(anchor_path("distserve-a100-max-num-tokens.csv")))


def workload_lengths(name: str, n: int = 2000, seed: int = 0) -> list[tuple[int, int]]:
    from client.bench.workloads import WorkloadSpec, load_workload
    return [(r.prompt_len, r.output_len) for r in load_workload(WorkloadSpec(name, n, seed)).requests]


def make_planner(lengths, slo: SLO = CHATBOT_SLO, cluster: Cluster = Cluster(4, 8),
                 **space) -> Planner:
    table, _, capacity = _tables()
    return Planner(SearchSpace(MODEL, table, capacity, **{"pps": (1, 2),
                   "kv_bytes_per_token": KV_BYTES_PER_TOKEN[MODEL], **space}), lengths, slo, cluster)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _plan(p: Placement | None) -> dict | None:
    if p is None:
        return None
    return {**asdict(p), "per_device": p.per_device, "text": describe(p)}


def describe(p: Placement | None) -> str:
    if p is None:
        return "none"
    if p.decode is None:
        per_tp = ", ".join(f"TP{tp} {g:.2f}" for tp, g in p.notes.get("per_tp", {}).items())
        return f"colocated TP{p.prefill.tp} x{p.num_prefill} (req/s per instance: {per_tp})"
    units = f" per {p.prefill.pp}-node unit x{p.num_units}" if p.algorithm == "low" else ""
    return (f"{p.algorithm}: prefill TP{p.prefill.tp} PP{p.prefill.pp} x{p.num_prefill}, decode "
            f"TP{p.decode.tp} PP{p.decode.pp} x{p.num_decode}{units}")


def _stats(lengths) -> dict:
    p, o = np.array([x for x, _ in lengths]), np.array([y for _, y in lengths])
    return {"num": len(lengths), "prompt_mean": float(p.mean()), "prompt_median": float(np.median(p)),
            "output_mean": float(o.mean()), "output_median": float(np.median(o))}


def search(name: str, lengths, workers: int) -> tuple[Planner, dict]:
    """Sections 1-3."""
    _, vllm, _ = _tables()
    planner = make_planner(lengths, workers=workers)
    wall, cpu = time.perf_counter(), _cpu_s()
    plans = {"low": plan_low(planner), "high": plan_high(planner)}
    timing = {"search_s": time.perf_counter() - wall, "cpu_s": _cpu_s() - cpu,
              "num_sims": planner.num_sims, "workers": workers}
    chosen = max((p for p in plans.values() if p), key=lambda p: (p.per_device, p.goodput))
    colo = {"vllm": plan_colocated(planner, vllm), "distserve": plan_colocated(planner, planner.space.table)}
    paper = plan_fixed(planner, 2, 1, 1)
    doc = {"workload": name, "lengths": _stats(lengths), "timing": timing,
           "plans": {k: _plan(v) for k, v in plans.items()}, "chosen": _plan(chosen),
           "paper_placement": _plan(paper), "colocated": {k: _plan(v) for k, v in colo.items()},
           "gain_vs_vllm": chosen.per_device / colo["vllm"].per_device,
           "gain_vs_colocated_distserve": chosen.per_device / colo["distserve"].per_device,
           "paper_placement_gain_vs_vllm": paper.per_device / colo["vllm"].per_device}
    return planner, doc


def phase_table(planner: Planner) -> dict:
    """Section 4: every (tp, pp) of each phase, searched."""
    return {phase: [{**asdict(c), "per_device": c.per_device} for c in planner.phase_choices(phase)]
            for phase in ("prefill", "decode")}


def long_window(lengths, doc: dict, workers: int) -> dict:
    """Section 5a: the placements re-measured with 16-lifetime windows (same parallelism, n:m
    re-chosen from the re-measured phases), the colocated baselines at their tp."""
    _, vllm, _ = _tables()
    planner = make_planner(lengths, workers=workers, window_lifetimes=LONG_WINDOW)
    out = {}
    for key in ("chosen", "paper_placement"):
        p = doc[key]
        if p["algorithm"] == "low":
            placed = plan_fixed(planner, p["prefill"]["tp"], p["decode"]["tp"], p["prefill"]["pp"])
            out[key] = _plan(placed)
    for key, table in (("vllm", vllm), ("distserve", planner.space.table)):
        c = doc["colocated"][key]
        spec = planner.space.instance(DEVICE, c["prefill"]["tp"], 1, table=table)
        g = planner.search_goodput(SimConfig("colocated", prefill=spec), c["prefill"]["goodput"], 1.1)
        out[f"colocated_{key}"] = {"tp": c["prefill"]["tp"], "goodput": g,
                                   "per_device": g / c["prefill"]["tp"]}
    base = out["colocated_vllm"]["per_device"]
    for key in ("chosen", "paper_placement"):
        if out.get(key):
            out[f"{key}_gain_vs_vllm"] = out[key]["per_device"] / base
    return out


def probe_accuracy(lengths, doc: dict) -> list[dict]:
    """Section 5b: one config per kind, goodput by the old probe (30 s of arrivals from empty,
    all counted, at most 1500 requests), by 4 lifetimes after a warm-up (the search) and by 16."""
    _, vllm, capacity = _tables()
    chosen, colo = doc["chosen"], doc["colocated"]["vllm"]
    rows = []
    for kind, tp, pp, table in (("decode", chosen["decode"]["tp"], chosen["decode"]["pp"], None),
                                ("colocated (vLLM)", colo["prefill"]["tp"], 1, vllm)):
        row = {"kind": kind, "tp": tp, "pp": pp}
        for k in (4.0, LONG_WINDOW):
            planner = make_planner(lengths, window_lifetimes=k)
            spec = planner.space.instance(DEVICE, tp, pp, table=table)
            config = SimConfig("decode", decode=spec) if table is None else \
                SimConfig("colocated", prefill=spec)
            fluid = decode_fluid_rate(spec, lengths, CHATBOT_SLO)
            row[f"k{k:g}"] = planner.search_goodput(config, fluid, 1.1)
        old = make_probe(config, lengths, CHATBOT_SLO, 0, 300, 30.0, 1500)
        row["old_30s"] = goodput(old, CHATBOT_SLO.target, fluid, 0.04, step=1.2)
        row["fluid"] = fluid
        rows.append(row)
    return rows


def motivation(workers: int) -> dict:
    """OPT-13B TP1 on one A100, every request 512 in / 64 out, SLOs TTFT 0.4 s, TPOT 0.04 s."""
    _, vllm, _ = _tables()
    planner = make_planner([(512, 64)], MOTIVATION_SLO, Cluster(1, 1), pps=(1,), workers=workers)
    g_p = planner.phase_goodput("prefill", 1, 1).goodput
    g_d = planner.phase_goodput("decode", 1, 1).goodput
    colo = {}
    for key, table in (("vllm", vllm), ("distserve", planner.space.table)):
        spec = planner.space.instance(DEVICE, 1, 1, table=table)
        guess = 0.7 * decode_fluid_rate(spec, planner.lengths, MOTIVATION_SLO)
        colo[key] = planner.search_goodput(SimConfig("colocated", prefill=spec), guess, 1.2)
    per_gpu = max((min(n * g_p, m * g_d) / (n + m), n, m) for n in range(1, 5) for m in range(1, 5))
    return {"slo": asdict(MOTIVATION_SLO), "prefill_only": g_p, "decode_only": g_d,
            "colocated": colo, "disaggregated_per_gpu": per_gpu[0],
            "disaggregated_n_m": per_gpu[1:], "paper": PAPER["motivation_rps"]}


def run(workloads: list[str], workers: int, quick: bool) -> dict:
    doc: dict[str, Any] = {"model": MODEL, "cluster": "4 nodes x 8 A100-80GB", "slo": asdict(CHATBOT_SLO),
                           "paper": PAPER, "before": BEFORE, "workloads": {}}
    for name in workloads:
        lengths = workload_lengths(name)
        planner, w = search(name, lengths, workers)
        print(f"{name}: {w['chosen']['text']}, {w['chosen']['per_device']:.2f} req/s/GPU, "
              f"{w['gain_vs_vllm']:.2f}x vLLM; search {w['timing']['search_s']:.1f} s", flush=True)
        if not quick:
            w["phases"] = phase_table(planner)
            w["long_window"] = long_window(lengths, w, workers)
            w["probe_accuracy"] = probe_accuracy(lengths, w)
        doc["workloads"][name] = w
    if not quick:
        doc["motivation"] = motivation(workers)
    return doc


# ---- report ----------------------------------------------------------------------------------

def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _placement_rows(w: dict) -> list[str]:
    rows = [_row(["plan", "placement", "GPUs", "goodput req/s", "per GPU", "vs vLLM"]),
            _row(["---"] * 6)]
    base = w["colocated"]["vllm"]["per_device"]
    named = [("chosen", w["chosen"]), ("low", w["plans"]["low"]), ("high", w["plans"]["high"]),
             ("paper's Table 3", w["paper_placement"]), ("colocated vLLM", w["colocated"]["vllm"]),
             ("colocated DistServe coeffs", w["colocated"]["distserve"])]
    for label, p in named:
        if p:
            rows.append(_row([label, p["text"], p["num_devices"], f"{p['goodput']:.1f}",
                              f"{p['per_device']:.2f}", f"{p['per_device'] / base:.2f}x"]))
    return rows


def markdown(doc: dict) -> str:
    out = ["# Planner paper check (OPT-13B, A100 coefficients, chatbot SLOs)", "",
           "Generated by `python -m planner.paper_check`; numbers in "
           "docs/planner_paper_check.json. See the notes at the end.", ""]
    for name, w in doc["workloads"].items():
        ls, t = w["lengths"], w["timing"]
        out += [f"## Workload `{name}`", "",
                f"{ls['num']} requests from client/bench (SmolLM2 tokenizer): prompt mean "
                f"{ls['prompt_mean']:.0f} / median {ls['prompt_median']:.0f} tokens, output mean "
                f"{ls['output_mean']:.0f} / median {ls['output_median']:.0f}.", "",
                f"Search (both algorithms): {t['search_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU, "
                f"{t['num_sims']} simulations, {t['workers']} process(es).", ""]
        out += _placement_rows(w) + [""]
        if "long_window" in w:
            lw = w["long_window"]
            out += ["Re-measured with 16-lifetime windows (per GPU): "
                    + ", ".join(f"{k} {v['per_device']:.2f}" for k, v in lw.items()
                                if isinstance(v, dict) and "per_device" in v)
                    + "; gain vs vLLM: chosen "
                    + (f"{lw['chosen_gain_vs_vllm']:.2f}x" if "chosen_gain_vs_vllm" in lw else "n/a")
                    + ", paper's placement "
                    + (f"{lw['paper_placement_gain_vs_vllm']:.2f}x" if "paper_placement_gain_vs_vllm" in lw
                       else "n/a") + ".", ""]
            out += ["Every phase configuration alone (goodput per instance / per GPU):", "",
                    _row(["phase", "TP", "PP", "req/s", "per GPU"]), _row(["---"] * 5)]
            for phase, rows in w["phases"].items():
                out += [_row([phase, c["tp"], c["pp"], f"{c['goodput']:.2f}", f"{c['per_device']:.2f}"])
                        for c in rows]
            out += ["", "Probe design (goodput req/s of one instance):", "",
                    _row(["config", "old: 30 s from empty", "4 lifetimes (search)", "16 lifetimes",
                          "fluid decode"]), _row(["---"] * 5)]
            out += [_row([f"{r['kind']} TP{r['tp']} PP{r['pp']}", f"{r['old_30s']:.2f}", f"{r['k4']:.2f}",
                          f"{r['k16']:.2f}", f"{r['fluid']:.2f}"]) for r in w["probe_accuracy"]]
            out += [""]
    if "motivation" in doc:
        m = doc["motivation"]
        out += ["## Motivation figure (512 in, 64 out, one A100, TTFT 0.4 s / TPOT 0.04 s)", "",
                _row(["", "ours (req/s)", "paper"]), _row(["---"] * 3),
                _row(["colocated, vLLM coeffs", f"{m['colocated']['vllm']:.2f}", m["paper"]["colocated"]]),
                _row(["colocated, DistServe coeffs", f"{m['colocated']['distserve']:.2f}", ""]),
                _row(["prefill only", f"{m['prefill_only']:.2f}", m["paper"]["prefill_only"]]),
                _row(["decode only", f"{m['decode_only']:.2f}", m["paper"]["decode_only"]]),
                _row([f"disaggregated per GPU ({m['disaggregated_n_m'][0]}P+{m['disaggregated_n_m'][1]}D)",
                      f"{m['disaggregated_per_gpu']:.2f}", m["paper"]["disaggregated_per_gpu"]]), ""]
    b = doc["before"]
    out += ["## Search time before this change", "",
            f"`{b['command']}` at {b['commit']}: {b['search_s']} s wall, {b['cpu_s']} s CPU, "
            f"{b['num_sims']} simulations ({b['note']}).", ""]
    return "\n".join(out)


NOTES = "## Notes"          # from this heading on, the report is written by hand and kept


def kept_notes(path: Path) -> str:
    """The hand-written notes of an earlier report (regenerating keeps them)."""
    text = path.read_text() if path.is_file() else ""
    return text[text.index(NOTES):] if NOTES in text else f"{NOTES}\n\n(none yet)\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.paper_check")
    ap.add_argument("--workloads", default="chatbot,chatbot-history")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="search and baselines only")
    ap.add_argument("--out", default="docs/planner_paper_check")
    args = ap.parse_args(argv)
    doc = run(args.workloads.split(","), args.workers, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(doc) + "\n" + kept_notes(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
