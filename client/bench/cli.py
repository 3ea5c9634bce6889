"""`python -m client.bench run|goodput|compare|plot|baseline|describe ...` (default: goodput).

    python -m client.bench compare --workload chatbot-history     # = ./build.sh bench goodput

    python -m client.bench describe --workload chatbot --max-output-tokens 64
    python -m client.bench run --workload chatbot --rate 1 --num-requests 50 \\
        --max-prompt-tokens 256 --max-output-tokens 32 --slo-ttft 5 --slo-tpot 5
    python -m client.bench goodput --workload code --endpoint triton-grpc --url 127.0.0.1:8001 \\
        --slo-mode absolute --slo-ttft 0.5 --slo-tpot 0.1 --out results/code.json
    python -m client.bench plot results/a.json results/b.json --out-dir results/plots

SLOs: with --slo-mode relative (default) --slo-ttft / --slo-tpot are multiples of the median
TTFT / TPOT of requests sent one at a time to the idle server (measured first, or given with
--baseline-ttft / --baseline-tpot so several systems share one; measured on requests whose prompts are
near the workload's p90 length, --baseline-quantile); with absolute, seconds.
Every result file records the workload (with its caps), the endpoint, the SLOs and the baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .endpoints import ENDPOINTS
from .goodput import DEFAULT_SCALES, GoodputResult, Point, measure_baseline, search_goodput, sweep
from .metrics import SLO, attainment, summarize
from .runner import replay
from .workloads import DEFAULT_TOKENIZER, WORKLOADS, LengthCaps, Workload, WorkloadSpec, load_workload

DEFAULT_URLS = {"triton-http": "127.0.0.1:8000", "triton-grpc": "127.0.0.1:8001",
                "openai": "http://127.0.0.1:8000"}
COMMANDS = ("run", "goodput", "compare", "plot", "baseline", "describe")
# compare's default SLOs, as multiples of the single-request TTFT / TPOT at the workload's p90
# prompt (the baseline): the paper's SLO (Table 1) over the paper's model's single-request
# latency on an A100 at the same workload's p90 prompt, from the published coefficients
# (../shared/anchors): chatbot OPT-13B TP1 0.25 s / 0.1 s; code OPT-66B TP4 0.125 s / 0.2 s;
# summarization OPT-66B TP4 15 s / 0.15 s.
PAPER_SLO_MULTIPLES = {"chatbot": (5.5, 5.0), "chatbot-history": (1.3, 4.8), "code": (1.9, 6.5),
                       "summarization": (40.0, 4.7)}


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="chatbot")
    g.add_argument("--num-requests", type=int, default=100, help="per measured rate (default: 100)")
    g.add_argument("--seed", type=int, default=0, help="sampling and arrivals (default: 0)")
    g.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="the served model's .gguf or tokenizer folder (default: the default model)")
    g.add_argument("--max-prompt-tokens", type=int, help="cap prompt lengths (see --cap-mode)")
    g.add_argument("--max-output-tokens", type=int, help="cap output lengths (see --cap-mode)")
    g.add_argument("--prompt-scale", type=float, default=1.0, help="multiply prompt lengths (<= 1)")
    g.add_argument("--output-scale", type=float, default=1.0, help="multiply output lengths")
    g.add_argument("--cap-mode", choices=("truncate", "filter"), default="truncate",
                   help="truncate to the caps, or drop the requests above them (default: truncate)")
    g.add_argument("--no-paper-filter", dest="paper_filter", action="store_false",
                   help="keep the requests the paper's ShareGPT pruning rule drops")


def _server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="triton-http")
    g.add_argument("--url", help=f"default: {DEFAULT_URLS}")
    g.add_argument("--model", default=None, help="default: distserve (Triton), default (openai)")
    g.add_argument("--label", help="the system's name in plots (default: endpoint:model)")
    g.add_argument("--timeout", type=float, default=600.0, help="per request, s (default: 600)")
    g.add_argument("--warmup", type=int, default=2, help="unrecorded requests first (default: 2)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _slo_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("SLOs")
    g.add_argument("--slo-mode", choices=("absolute", "relative"), default="relative")
    g.add_argument("--slo-ttft", type=float, required=required, help="s, or a baseline multiple")
    g.add_argument("--slo-tpot", type=float, required=required, help="s, or a baseline multiple")
    g.add_argument("--baseline-ttft", type=float, help="relative mode: a known baseline TTFT (s)")
    g.add_argument("--baseline-tpot", type=float, help="relative mode: a known baseline TPOT (s)")
    g.add_argument("--baseline-requests", type=int, default=5,
                   help="relative mode: requests sent one at a time to measure it (default: 5)")
    g.add_argument("--baseline-quantile", type=float, default=0.9,
                   help="relative mode: measure it on the requests whose prompt length is nearest "
                        "this quantile of the workload's (default: 0.9, so that a multiple >= 1 "
                        "is one most requests can meet on an idle server)")
    g.add_argument("--scales", type=_floats, default=list(DEFAULT_SCALES),
                   help="SLO scales of the sweep, comma-separated")
    g.add_argument("--target", type=float, default=0.9, help="attainment target (default: 0.9)")


def _search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput search")
    g.add_argument("--cv", type=float, default=1.0, help="arrival gaps' CV (1: Poisson)")
    g.add_argument("--start-rate", type=float, default=1.0)
    g.add_argument("--min-rate", type=float, default=0.02)
    g.add_argument("--max-rate", type=float, default=256.0)
    g.add_argument("--rel-tol", type=float, default=0.1, help="stop when the bracket is this "
                   "narrow, relative (default: 0.1)")
    g.add_argument("--max-measurements", type=int, default=10)
    g.add_argument("--sweep-rate", type=float, help="rate of the SLO-scale sweep and CDFs "
                   "(default: the goodput found)")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "goodput")
    p = argparse.ArgumentParser(prog="python -m client.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay a workload at one rate")
    _workload_args(run)
    _server_args(run)
    _slo_args(run, required=False)
    run.add_argument("--rate", type=float, required=True, help="requests/s")
    run.add_argument("--cv", type=float, default=1.0, help="arrival gaps' CV (1: Poisson)")
    run.add_argument("--out", type=Path, help="JSON file (default: results/run-<workload>-...json)")
    good = sub.add_parser("goodput", help="search the highest rate meeting the SLO target")
    _workload_args(good)
    _server_args(good)
    _slo_args(good, required=True)
    _search_args(good)
    good.add_argument("--out", type=Path, help="JSON file (default: results/goodput-<workload>-...json)")
    good.add_argument("--no-plot", dest="plot", action="store_false")
    comp = sub.add_parser("compare", help="the headline: disaggregated vs colocated vs chunked "
                          "prefill on the same cores (starts each server in turn)")
    _workload_args(comp)
    g = comp.add_argument_group("endpoint")
    g.add_argument("--endpoint", choices=("triton-grpc", "triton-http"), default="triton-grpc")
    g.add_argument("--timeout", type=float, default=600.0, help="per request, s (default: 600)")
    g.add_argument("--warmup", type=int, default=2, help="unrecorded requests first (default: 2)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    _slo_args(comp, required=False)
    _search_args(comp)
    from .compare import add_compare_arguments
    add_compare_arguments(comp)
    plot = sub.add_parser("plot", help="PNG plots of result files, one line per file")
    plot.add_argument("files", nargs="+", type=Path)
    plot.add_argument("--labels", nargs="+", help="one per file (default: the files' labels)")
    plot.add_argument("--out-dir", type=Path, default=Path("results"))
    plot.add_argument("--prefix", default="")
    base = sub.add_parser("baseline", help="median TTFT/TPOT of requests sent one at a time")
    _workload_args(base)
    _server_args(base)
    base.add_argument("--baseline-requests", type=int, default=5)
    base.add_argument("--baseline-quantile", type=float, default=0.9)
    desc = sub.add_parser("describe", help="the workload's length statistics (no server)")
    _workload_args(desc)
    args = p.parse_args(argv)
    args.argv = argv
    if args.command == "compare":
        args.label = args.url = args.model = None
        _default_slo(args)
    elif hasattr(args, "endpoint"):
        args.url = args.url or DEFAULT_URLS[args.endpoint]
        args.model = args.model or ("default" if args.endpoint == "openai" else "distserve")
        args.label = args.label or f"{args.endpoint}:{args.model}"
    return args


def _default_slo(args: argparse.Namespace) -> None:
    """compare without SLOs: the paper's, as multiples (PAPER_SLO_MULTIPLES)."""
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        raise SystemExit("error: give both --slo-ttft and --slo-tpot, or neither")
    if args.slo_ttft is None:
        if args.slo_mode != "relative":
            raise SystemExit("error: --slo-mode absolute needs --slo-ttft and --slo-tpot")
        args.slo_ttft, args.slo_tpot = PAPER_SLO_MULTIPLES[args.workload]


def build_workload(args: argparse.Namespace) -> Workload:
    caps = LengthCaps(args.max_prompt_tokens, args.max_output_tokens, args.prompt_scale,
                      args.output_scale, args.cap_mode)
    spec = WorkloadSpec(args.workload, args.num_requests, args.seed, caps, args.paper_filter)
    return load_workload(spec, args.tokenizer)


def resolve_slo(args: argparse.Namespace, workload: Workload, url: str | None = None,
                model: str | None = None) -> tuple[SLO | None, dict[str, Any] | None]:
    """The SLO in seconds, and what the result file records about it (a relative SLO's
    baseline is measured on url/model, default: the command line's)."""
    if args.slo_ttft is None or args.slo_tpot is None:
        return None, None
    info: dict[str, Any] = {"mode": args.slo_mode}
    if args.slo_mode == "absolute":
        slo = SLO(args.slo_ttft, args.slo_tpot)
    else:
        if args.baseline_ttft is not None and args.baseline_tpot is not None:
            base = {"ttft_s": args.baseline_ttft, "tpot_s": args.baseline_tpot, "source": "given"}
        else:
            b = _baseline(args, workload, url or args.url, model or args.model)
            base = {**asdict(b), "source": "measured", "prompt_quantile": args.baseline_quantile}
        slo = SLO(base["ttft_s"] * args.slo_ttft, base["tpot_s"] * args.slo_tpot)
        info.update(ttft_multiple=args.slo_ttft, tpot_multiple=args.slo_tpot, baseline=base)
    return slo, {**info, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}


def _baseline(args: argparse.Namespace, workload: Workload, url: str, model: str) -> Any:
    requests = baseline_requests(workload.requests, args.baseline_requests, args.baseline_quantile)
    log(f"measuring the baseline: {len(requests)} requests one at a time on {url} ({model}), "
        f"prompts of {sorted(r.prompt_len for r in requests)} tokens")
    b = measure_baseline(args.endpoint, url, model, requests, args.timeout)
    log(f"baseline: TTFT {b.ttft_s * 1e3:.1f} ms, TPOT {b.tpot_s * 1e3:.1f} ms")
    return b


def baseline_requests(requests: Sequence[Any], n: int, quantile: float) -> list[Any]:
    """The n requests (with >= 2 output tokens) whose prompt lengths are nearest the workload's
    `quantile` prompt length, in workload order. Prefill time on a CPU grows with the prompt,
    so a median-based TTFT SLO would be missed by every long prompt even on an idle server."""
    if not 0 <= quantile <= 1 or n < 1:
        raise ValueError(f"need n >= 1 and a quantile in [0, 1], got {n}, {quantile}")
    eligible = [r for r in requests if r.output_len >= 2]
    if not eligible:
        raise ValueError("no request has two output tokens to measure a TPOT with")
    target = float(np.quantile([r.prompt_len for r in eligible], quantile))
    nearest = sorted(range(len(eligible)), key=lambda i: (abs(eligible[i].prompt_len - target), i))[:n]
    return [eligible[i] for i in sorted(nearest)]


def header(args: argparse.Namespace, workload: Workload, kind: str) -> dict[str, Any]:
    return {"kind": kind, "label": args.label, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m client.bench " + " ".join(args.argv),
            "endpoint": {"name": args.endpoint, "url": args.url, "model": args.model},
            "workload": workload.describe(), "cv": args.cv, "timeout_s": args.timeout,
            "warmup": args.warmup}


def cmd_run(args: argparse.Namespace) -> int:
    workload = build_workload(args)
    slo, slo_info = resolve_slo(args, workload)
    results = replay(args.endpoint, args.url, args.model, workload.requests,
                     workload.arrivals(args.rate, args.cv), timeout_s=args.timeout,
                     warmup=workload.requests[:args.warmup], progress=args.progress,
                     desc=f"{args.label} @ {args.rate:g} rps")
    summary = summarize(results, slo)
    doc = {**header(args, workload, "run"), "rate": args.rate, "slo": slo_info, "summary": summary,
           "sweep": None if slo is None else {"rate": args.rate, "scales": args.scales,
                                             "points": sweep(results, slo, args.scales)},
           "results": [r.to_json() for r in results]}
    out = args.out or Path("results") / f"run-{args.workload}-{args.endpoint}-{args.rate:g}rps.json"
    write_json(out, doc)
    print(format_summary(args.label, args.rate, summary))
    return 0 if summary["num_ok"] else 1


def cmd_goodput(args: argparse.Namespace) -> int:
    workload = build_workload(args)
    slo, slo_info = resolve_slo(args, workload)
    doc = goodput_doc(args, workload, slo, slo_info, url=args.url, model=args.model,
                      label=args.label, start_rate=args.start_rate)
    out = args.out or Path("results") / f"goodput-{args.workload}-{args.endpoint}.json"
    write_json(out, doc)
    print(format_goodput(doc))
    if args.plot:
        from .plots import plot_docs
        for path in plot_docs([doc], [args.label], out.parent, prefix=out.stem + "-"):
            log(f"wrote {path}")
    return 0


def goodput_doc(args: argparse.Namespace, workload: Workload, slo: SLO, slo_info: dict[str, Any],
                *, url: str, model: str, label: str, start_rate: float) -> dict[str, Any]:
    """Search one endpoint's goodput, then measure the SLO-scale sweep at the goodput found;
    the result document (every request of every rate measured)."""
    warmup = list(workload.requests[:args.warmup])

    def measure(rate: float) -> list[Any]:
        results = replay(args.endpoint, url, model, workload.requests,
                         workload.arrivals(rate, args.cv), timeout_s=args.timeout,
                         warmup=warmup, progress=args.progress, desc=f"{label} @ {rate:.3g} rps")
        warmup.clear()                                       # only before the first rate
        return results

    def report(p: Point) -> None:
        log(f"{label}: rate {p.rate:.3g} rps: attainment {100 * p.attainment:.1f}%")
        # each rate's requests as soon as they are in, so an interrupted search keeps them
        partial = Path("results") / "partial" / f"{args.workload}-{model}-{url.replace(':', '_')}-{p.rate:.4g}.json"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"label": label, "rate": p.rate, "attainment": p.attainment,
                                       "summary": summarize(p.results, slo),
                                       "results": [r.to_json() for r in p.results]}))

    found = search_goodput(measure, slo, target=args.target, start_rate=start_rate,
                           min_rate=args.min_rate, max_rate=args.max_rate, rel_tol=args.rel_tol,
                           max_measurements=args.max_measurements, on_point=report)
    sweep_rate = args.sweep_rate or found.goodput_rps or min(p.rate for p in found.points)
    if all(p.rate != sweep_rate for p in found.points):
        results = tuple(measure(sweep_rate))
        extra = Point(sweep_rate, attainment(results, slo), results)
        found = GoodputResult(found.goodput_rps, found.fail_rps, found.target, found.points + (extra,))
    return {**header(args, workload, "goodput"), "label": label,
            "endpoint": {"name": args.endpoint, "url": url, "model": model},
            "slo": slo_info, "target": args.target,
            "goodput_rps": found.goodput_rps, "fail_rps": found.fail_rps,
            "is_capped": found.is_capped,
            "points": [{"rate": p.rate, "attainment": p.attainment,
                        "summary": summarize(p.results, slo),
                        "results": [r.to_json() for r in p.results]} for p in found.points],
            "sweep": {"rate": sweep_rate, "scales": args.scales,
                      "points": sweep(found.point(sweep_rate).results, slo, args.scales)}}


def format_goodput(doc: dict[str, Any]) -> str:
    slo = doc["slo"]
    bound = "at least " if doc["is_capped"] else ""
    return (f"{doc['label']}: goodput {bound}{doc['goodput_rps']:.3g} rps at "
            f"{100 * doc['target']:.0f}% attainment (TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, "
            f"TPOT <= {slo['tpot_s'] * 1e3:.0f} ms); {len(doc['points'])} rates measured")


def cmd_compare(args: argparse.Namespace) -> int:
    import signal
    from .compare import format_table, run_compare, write_summary
    signal.signal(signal.SIGTERM, _interrupt)              # stop the server in use on SIGTERM too
    combined = run_compare(args)
    for path in write_summary(combined, args.out_dir, args.name or args.workload):
        log(f"wrote {path}")
    print(format_table(combined))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import doc_label, plot_docs
    docs = [json.loads(f.read_text()) for f in args.files]
    labels = args.labels or [doc_label(d, f.stem) for d, f in zip(docs, args.files)]
    if len(labels) != len(docs):
        raise SystemExit(f"error: {len(docs)} files but {len(labels)} labels")
    for path in plot_docs(docs, labels, args.out_dir, args.prefix):
        print(path)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    b = _baseline(args, build_workload(args), args.url, args.model)
    print(json.dumps(asdict(b)))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    print(json.dumps(build_workload(args).describe(), indent=2))
    return 0


def format_summary(label: str, rate: float, s: dict[str, Any]) -> str:
    def ms(block: Any, key: str) -> str:
        return "-" if not block else f"{block[key] * 1e3:.0f}"
    line = (f"{label} @ {rate:g} rps: {s['num_ok']}/{s['num_requests']} ok; "
            f"TTFT p50/p90 {ms(s['ttft_s'], 'p50')}/{ms(s['ttft_s'], 'p90')} ms, "
            f"TPOT p50/p90 {ms(s['tpot_s'], 'p50')}/{ms(s['tpot_s'], 'p90')} ms")
    if "attainment" in s:
        line += f"; attainment {100 * s['attainment']:.1f}%"
    return line


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    log(f"wrote {path}")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handlers = {"run": cmd_run, "goodput": cmd_goodput, "compare": cmd_compare, "plot": cmd_plot,
                "baseline": cmd_baseline, "describe": cmd_describe}
    return handlers[args.command](args)
