"""The headline comparison: our disaggregated system vs the colocated baselines, same cores,
same workload, same SLOs, one after the other in one run.

    python -m client.bench compare --workload chatbot-history --slo-ttft 5 --slo-tpot 5
    ./build.sh bench goodput --workload code ...        # the same command

For each system (--systems, default disaggregated,colocated,chunked) it renders the model
repository from the deployment (deploy.deployment, for this host's cores: on 2 cores the default
is 1 prefill instance on core 0 + 1 decode instance on core 1; colocated: one instance per core,
each doing both phases; chunked-N: the same with chunked prefill under an N-token budget),
starts tritonserver on free loopback ports, searches the goodput with the same workload and
SLOs, and stops the server before the next one starts. Each system's label names the
instances and cores of the deployment it served. Relative SLOs are multiples of the
single-request latency measured once, on the first system, and shared by all. Writes the full
results to results/compare-<name>.json and a summary (JSON without per-request records, a
markdown table with ratios and a time breakdown, PNG plots) to --out-dir (default
results/goodput/, untracked; docs/goodput/ holds the runs we chose to publish).
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .metrics import RequestResult, route_counts, time_breakdown

DEFAULT_SYSTEMS = ("disaggregated", "colocated", "chunked")
DEFAULT_OUT_DIR = Path("results") / "goodput"
# What each system is; its label adds the instances and cores of the deployment it served.
SYSTEM_NAMES = {"disaggregated": "DistServe",
                "adaptive": "DistServe adaptive (SLO-routed local prefill)",
                "adaptive-shared": "DistServe adaptive, a decode instance on prefill's cores",
                "colocated": "colocated",
                "chunked": "colocated + chunked prefill (budget {budget})"}


@dataclass(frozen=True)
class System:
    """One system to measure: its name (`chunked-256` has a token budget; `<system>+ngram`
    decodes speculatively with that drafter; `+model` drafts with a draft model, here the
    served model itself), model to call."""
    kind: str                        # disaggregated | adaptive | colocated | chunked
    token_budget: int | None = None
    speculative: str | None = None   # a drafter (deploy.deployment.SPECULATIVE_METHODS)
    draft_core: int | None = None    # `+ngram@0`: the drafter in a process of its own on this core

    @property
    def name(self) -> str:
        base = f"chunked-{self.token_budget}" if self.kind == "chunked" else self.kind
        core = f"@{self.draft_core}" if self.draft_core is not None else ""
        return base + (f"+{self.speculative}{core}" if self.speculative else "")

    def label(self, deployment: Any) -> str:
        """What this system is, and where the deployment it served ran (its instances, cores)."""
        where = "" if self.draft_core is None else f" in a process on core {self.draft_core}"
        spec = f", speculative decoding ({self.speculative} drafter{where}, adaptive k)" \
            if self.speculative else ""
        return f"{SYSTEM_NAMES[self.kind].format(budget=self.token_budget)}{spec}: " \
               f"{placement(deployment)}"

    @property
    def model(self) -> str:
        from deploy.contract import DISTSERVE, DISTSERVE_COLOCATED
        return DISTSERVE if self.kind in ("disaggregated", "adaptive", "adaptive-shared") \
            else DISTSERVE_COLOCATED

    def deployment(self, model_path: str | Path, num_cores: int | None = None) -> Any:
        dep = self._deployment(model_path, num_cores)
        if self.speculative is None:
            return dep
        draft = {"draft_model": str(model_path)} if self.speculative == "model" else {}
        decoding = {name: replace(phase, speculative=self.speculative, **draft, draft_devices=None
                                  if self.draft_core is None else ((self.draft_core,),) * phase.num_instances)
                    for name in ("decode", "colocated") if (phase := getattr(dep, name)) is not None}
        return replace(dep, **decoding)

    def _deployment(self, model_path: str | Path, num_cores: int | None = None) -> Any:
        from deploy.deployment import colocated_deployment, default_deployment
        if self.kind == "disaggregated":
            return default_deployment(model_path, num_cores)
        if self.kind in ("adaptive", "adaptive-shared"):
            from planner.deployment import serving, with_decode_on_prefill_cores
            dep = default_deployment(model_path, num_cores)
            if self.kind == "adaptive-shared":
                dep = with_decode_on_prefill_cores(dep)
            return serving(dep, "adaptive")
        if self.kind == "colocated":
            return colocated_deployment(model_path, num_cores)
        return colocated_deployment(model_path, num_cores, chunked_prefill=True,
                                    token_budget=self.token_budget)


def placement(deployment: Any) -> str:
    """Where `deployment`'s serving instances run, e.g. "1 prefill on core 0 + 1 decode on core 1",
    "2 instances on cores 0-3 and 4-7", "1 prefill on GPU 0 + 2 decode on GPUs 1 and 2"."""
    names = ("colocated",) if deployment.systems == ("colocated",) else ("prefill", "decode")
    return " + ".join(_phase_placement(name, getattr(deployment, name)) for name in names)


def _phase_placement(name: str, phase: Any) -> str:
    if phase.device == "gpu":
        where = "GPU" + ("s" if len(phase.devices) > 1 else "")
        groups = [str(g) for g in phase.devices]
    else:
        where = "core" + ("s" if any(len(c) > 1 for c in phase.devices) or len(phase.devices) > 1 else "")
        groups = [_core_span(cores) for cores in phase.devices]
    what = name if name != "colocated" else "instance" + ("s" if phase.num_instances > 1 else "")
    return f"{phase.num_instances} {what} on {where} {' and '.join(groups)}"


def _core_span(cores: Sequence[int]) -> str:
    """(4, 5, 6, 7) -> "4-7"; (0, 2) -> "0,2"; (1,) -> "1"."""
    cores = sorted(cores)
    if len(cores) > 2 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def without_prefix_caching(dep: Any) -> Any:
    """`dep` with every phase's prefix cache and n-gram draft corpus off. The goodput search
    replays the same requests at every rate on one server: with the cache on, every rate after
    the first would hit the prompts of the rates before it, and the drafter would copy their
    earlier outputs (a benchmark artifact, not a workload's reuse)."""
    phases = {name: replace(getattr(dep, name), prefix_caching=False, draft_corpus=False)
              for name in ("prefill", "decode", "colocated") if getattr(dep, name) is not None}
    return replace(dep, **phases)


def parse_system(text: str) -> System:
    """`disaggregated`, `adaptive`, `adaptive-shared`, `colocated`, `chunked` (the default
    budget) or `chunked-<budget>`, each optionally `+<drafter>` (speculative decoding) or
    `+<drafter>@<core>` (the drafter in a process of its own on that core)."""
    from deploy.deployment import DEFAULT_CHUNKED_TOKEN_BUDGET, SPECULATIVE_METHODS
    text = text.strip()
    if "+" in text:
        base, drafter = text.split("+", 1)
        drafter, _, core = drafter.partition("@")
        if drafter not in SPECULATIVE_METHODS or (core and not core.isdigit()):
            raise ValueError(f"unknown drafter in system {text!r}: one of {SPECULATIVE_METHODS}, "
                             "optionally @<core>")
        return replace(parse_system(base), speculative=drafter, draft_core=int(core) if core else None)
    if text in ("disaggregated", "adaptive", "adaptive-shared", "colocated"):
        return System(text)
    m = re.fullmatch(r"chunked(?:-(\d+))?", text)
    if not m:
        raise ValueError(f"unknown system {text!r}: use disaggregated, adaptive, adaptive-shared, "
                         "colocated, chunked or chunked-<token budget>")
    budget = int(m.group(1)) if m.group(1) else DEFAULT_CHUNKED_TOKEN_BUDGET
    if budget < 1:
        raise ValueError(f"{text}: the token budget must be >= 1")
    return System("chunked", budget)


def parse_systems(text: str) -> list[System]:
    systems = [parse_system(s) for s in text.split(",") if s.strip()]
    names = [s.name for s in systems]
    if not systems or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"need distinct systems, got {text!r}")
    return systems


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("systems")
    g.add_argument("--systems", type=_systems_arg, default=list(map(parse_system, DEFAULT_SYSTEMS)),
                   help="comma-separated: disaggregated, adaptive, adaptive-shared, colocated, chunked, "
                        "chunked-<budget>, each optionally +ngram or +model (speculative decoding; "
                        "+ngram@0: its drafter in a process on core 0) "
                        f"(default: {','.join(DEFAULT_SYSTEMS)})")
    g.add_argument("--serve-model", help="model file served (default: the deployment's default)")
    g.add_argument("--prefix-caching", action="store_true",
                   help="serve with the prefix cache and the n-gram draft corpus on (off by default "
                        "here: the search replays the same requests at every rate, so later rates "
                        "would hit earlier ones)")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help="summary JSON, markdown and plots (default: %(default)s, untracked; "
                        "--out-dir docs/goodput to publish a run)")
    g.add_argument("--max-model-len", type=int, help="serve with this context length instead of "
                   "the deployment's (2048), e.g. for summarization's 1900-2048-token prompts")
    g.add_argument("--name", help="file name stem of the outputs (default: the workload's name)")
    g.add_argument("--run-dir", type=Path, default=None,
                   help="server logs and rendered repositories (default: run/bench)")
    g.add_argument("--ready-timeout", type=float, default=600.0)


def _systems_arg(text: str) -> list[System]:
    try:
        return parse_systems(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every system in turn; the combined document (also written to results/)."""
    from deploy.deployment import DEFAULT_MODEL_PATH, ROOT
    from deploy.render import render_repository
    from deploy.server import TritonServer, free_ports

    from .cli import build_workload, goodput_doc, log, resolve_slo, write_json
    workload = build_workload(args)
    commit = _git_commit(ROOT)                   # what the servers run, read before they start
    run_root = (args.run_dir or ROOT / "run" / "bench").resolve()
    model_path = Path(args.serve_model).resolve() if args.serve_model else DEFAULT_MODEL_PATH
    slo = slo_info = None
    if args.slo_mode == "absolute" or (args.baseline_ttft is not None and args.baseline_tpot is not None):
        slo, slo_info = resolve_slo(args, workload)     # known now: every system's router gets it
    elif args.systems and args.systems[0].kind in ("adaptive", "adaptive-shared") and \
            args.slo_ttft is not None:
        raise ValueError(f"{args.systems[0].name} would serve before the relative SLO is measured "
                         "(on the first system): list a non-adaptive system first, or give "
                         "--baseline-ttft/--baseline-tpot or absolute SLOs")
    start_rate = args.start_rate
    docs = []
    for system in args.systems:
        deployment = system.deployment(model_path)
        if not args.prefix_caching:
            deployment = without_prefix_caching(deployment)
        if slo is not None:         # the router's SLOs, and every system's overload limit
            deployment = replace(deployment, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s)
        elif deployment.overload_factor is not None:
            log(f"{system.name}: served with the deployment's TTFT SLO ({deployment.slo_ttft_s:g} s) "
                "until the run's is measured on it: it refuses a request predicted to wait over "
                f"{deployment.overload_factor * deployment.slo_ttft_s:g} s")
        if args.max_model_len:
            deployment = replace(deployment, max_model_len=args.max_model_len)
        run_dir = run_root / system.name
        repo = render_repository(deployment, run_dir / "model_repository", require_code=True)
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(repo, run_dir=run_dir, http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port)
        log(f"{system.name}: starting tritonserver (log {server.log_file})")
        server.start()
        try:
            server.wait_ready(args.ready_timeout)
            url = server.grpc_url if args.endpoint == "triton-grpc" else server.http_url
            if slo is None:                                  # measured once, on the first system
                slo, slo_info = resolve_slo(args, workload, url=url, model=system.model)
                slo_info = {**slo_info, "measured_on": system.name}
            load_before = os.getloadavg()
            t0 = time.monotonic()
            doc = goodput_doc(args, workload, slo, slo_info, url=url, model=system.model,
                              label=system.label(deployment), start_rate=start_rate)
            doc["system"] = {"name": system.name, "deployment": deployment.to_dict(),
                             "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                             "seconds": time.monotonic() - t0}
        finally:
            server.stop()
        docs.append(doc)
        log(f"{system.name}: goodput {doc['goodput_rps']:.3g} rps")
        if doc["goodput_rps"] > 0:
            start_rate = doc["goodput_rps"]               # the next search starts near it
    combined = {"kind": "compare", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "git_commit": commit,
                "command": "python -m client.bench " + " ".join(args.argv),
                "workload": workload.describe(), "slo": slo_info, "target": args.target,
                "systems": docs}
    write_json(Path("results") / f"compare-{args.name or args.workload}.json", combined)
    return combined


def _git_commit(root: Path) -> str | None:
    """The commit the servers ran (with `+dirty` when the tree had changes)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_summary(combined: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """docs: <name>.json (no per-request records), <name>.md, <name>-*.png."""
    import json

    from .plots import plot_docs
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = combined["systems"]
    paths = plot_docs(docs, [d["label"] for d in docs], out_dir, prefix=f"{name}-")
    summary = {**combined, "systems": [_strip(d) for d in docs]}
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=1))
    md = out_dir / f"{name}.md"
    md.write_text(markdown(summary, [p.name for p in paths]))
    return [out_dir / f"{name}.json", md, *paths]


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    """A system's document without per-request records, plus the time breakdown at each rate."""
    points = []
    for p in doc["points"]:
        results = [RequestResult.from_json(r) for r in p["results"]]
        points.append({k: v for k, v in p.items() if k != "results"} |
                      {"breakdown": time_breakdown(results), "routes": route_counts(results)})
    return {k: v for k, v in doc.items() if k != "points"} | {"points": points}


def _ratio(value: float, base: float | None) -> str:
    if not base:
        return "-"
    return f"{value / base:.2f}x"


def markdown(summary: dict[str, Any], plots: Sequence[str]) -> str:
    docs = summary["systems"]
    w = summary["workload"]
    slo = summary["slo"]
    base = next((d["goodput_rps"] for d in docs if d["system"]["name"] == "colocated"), None)
    lines = [f"# Goodput: {w['name']}", "",
             f"Command: `{summary['command']}` ({summary['created']}, commit "
             f"{summary.get('git_commit') or 'unknown'}).", "",
             f"Workload: {w['num_requests']} requests per rate, seed {w['seed']}, caps "
             f"{_caps(w['caps'])}; prompt tokens p50 {w['lengths']['prompt']['p50']:.0f} "
             f"(mean {w['lengths']['prompt']['mean']:.0f}), output tokens p50 "
             f"{w['lengths']['output']['p50']:.0f} (mean {w['lengths']['output']['mean']:.0f}). "
             f"Poisson arrivals.", "",
             f"SLOs: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.0f} ms"
             + _slo_origin(slo) + f"; goodput = the highest rate with >= "
             f"{100 * summary['target']:.0f}% of requests meeting both.", "",
             "| system | goodput (rps) | per core | vs colocated | rates measured (attainment) "
             "| load avg before/after | minutes |",
             "|---|---|---|---|---|---|---|"]
    for d in docs:
        cores = len(_cores(d["system"]["deployment"]))
        g = d["goodput_rps"]
        bound = ">= " if d["is_capped"] else ""
        pts = ", ".join(f"{p['rate']:.3g} ({100 * p['attainment']:.0f}%)"
                        for p in sorted(d["points"], key=lambda p: p["rate"]))
        lines.append(f"| {d['label']} | {bound}{g:.3g} | {g / cores:.3g} | {_ratio(g, base)} | "
                     f"{pts} | {d['system']['load_avg_before'][0]:.1f} / "
                     f"{d['system']['load_avg_after'][0]:.1f} | {d['system']['seconds'] / 60:.1f} |")
    lines += ["", "## Where the time goes", "",
              "Mean seconds per completed request at each system's highest passing rate (or its "
              "lowest rate if none passed), from the server's timing: queue = waiting for the "
              "first step; prefill = the step(s) computing the prompt; ttft other = the rest of "
              "TTFT (orchestrator, Triton, network); hand-off = first token sent -> KV admitted "
              "on decode (waiting for a decode slot + the copy); transfer = the KV copy alone; "
              "decode = KV admitted (colocated: first token) -> last token.", "",
              "| system | rate | TTFT | queue | prefill | ttft other | hand-off | transfer "
              "| decode | e2e | TPOT | TTFT met | TPOT met |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in docs:
        rate = d["goodput_rps"] or min(p["rate"] for p in d["points"])
        p = next(p for p in d["points"] if p["rate"] == rate)
        b = p["breakdown"]
        s = p["summary"]
        cells = [f"{b.get(k, 0.0):.3f}" for k in ("ttft", "queue", "prefill", "ttft_other",
                                                   "handoff", "transfer", "decode", "e2e", "tpot")]
        lines.append(f"| {d['system']['name']} | {rate:.3g} | " + " | ".join(cells) +
                     f" | {100 * s.get('ttft_attainment', 0):.0f}% | "
                     f"{100 * s.get('tpot_attainment', 0):.0f}% |")
    routed = [(d, p) for d in docs for p in sorted(d["points"], key=lambda p: p["rate"])
              if p.get("routes")]
    if routed:
        lines += ["", "Where the router sent the requests it placed (adaptive): " + "; ".join(
            f"{d['system']['name']} at {p['rate']:.3g} rps: " +
            ", ".join(f"{n} {kind}" for kind, n in sorted(p["routes"].items()))
            for d, p in routed) + "."]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def _cores(deployment: dict[str, Any]) -> set[int]:
    phases = [deployment.get("colocated")] if "colocated" in deployment["systems"] else \
        [deployment["prefill"], deployment["decode"]]
    return {c for ph in phases if ph for dev in ph["devices"] for c in dev}


def _caps(caps: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in caps.items() if v not in (None, 1.0)]
    return ", ".join(parts) or "none"


def _slo_origin(slo: dict[str, Any]) -> str:
    if slo.get("mode") != "relative":
        return " (absolute)"
    b = slo["baseline"]
    return (f" ({slo['ttft_multiple']:g}x / {slo['tpot_multiple']:g}x the single-request "
            f"TTFT {b['ttft_s'] * 1e3:.0f} ms / TPOT {b['tpot_s'] * 1e3:.0f} ms, "
            f"{b['source']} on {slo.get('measured_on', 'the first system')})")


def format_table(combined: dict[str, Any]) -> str:
    docs = combined["systems"]
    base = next((d["goodput_rps"] for d in docs if d["system"]["name"] == "colocated"), None)
    rows = [f"{'system':<16} {'goodput rps':>12} {'vs colocated':>13}"]
    for d in docs:
        bound = ">=" if d["is_capped"] else ""
        rows.append(f"{d['system']['name']:<16} {bound + format(d['goodput_rps'], '.3g'):>12} "
                    f"{_ratio(d['goodput_rps'], base):>13}")
    return "\n".join(rows)
