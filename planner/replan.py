"""Replan: does the current deployment still meet the SLOs on a recorded request trace, and what
would the planner run instead?

    python -m planner replan --trace TRACE --deployment DEP.json --ttft S --tpot S [--profile P]
                             [--devices NxM] [--rate R] [--json out.json]

TRACE is one of
- a result JSON of `python -m client.bench run` (its per-request `results`) or `goodput` (one of
  its `points`: --rate picks the one nearest R, default the highest rate measured);
- a JSON list of records, or JSONL, each with arrival_s, prompt_len, output_len;
- a CSV with the header arrival_s,prompt_len,output_len.
Arrival times are shifted to start at 0; the trace's rate is (n - 1) / (last - first arrival).

The report, all by simulation with the profile's latency model:
1. the trace replayed on the deployment at its own arrival times, per system it serves:
   attainment against the target (beside the measured attainment when the records carry
   latencies), TTFT/TPOT percentiles, and the deployment's goodput on the trace's lengths
   (Poisson arrivals), so the trace's rate reads as a share of what the deployment sustains;
2. the planner's choice on the cluster (--devices, default the cores the deployment uses) for
   the trace's lengths, its goodput, and its attainment on the trace itself;
3. sized for the trace's rate: the best per-phase configurations replicated
   n = ceil(R / prefill goodput), m = ceil(R / decode goodput) (Algorithm 1), then grown one
   instance at a time (the phase whose extra instance helps more) until the trace meets the
   target, at most --grow times: how many devices the trace needs;
4. the deployment's own devices served each way (planner/modes.py: split, adaptive,
   colocated): each mode's goodput on the trace's lengths and attainment on the trace, and the
   mode to serve instead when one pays (MODE_GAIN x the current mode's goodput, or it meets
   the target on the trace where the current mode does not). The current mode is the
   deployment file's "mode" (the planner writes it), else split (colocated for a deployment
   serving only the colocated system).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from planner.deployment import (Target, best_of, deployment_configs, deployment_mode, describe_cores,
                                load_deployment, placement_config, search)
from planner.modes import parse_modes, recommend, same_devices
from planner.placement import plan_colocated
from planner.search import SLO, Planner, goodput
from planner.simulator import Request, SimConfig, Simulator, make_requests

FIELDS = ("arrival_s", "prompt_len", "output_len")


@dataclass(frozen=True)
class Trace:
    arrivals: tuple[float, ...]
    lengths: tuple[tuple[int, int], ...]
    source: str
    records: tuple[dict, ...] = ()           # the bench's records, when they carry latencies
    slo: tuple[float, float] | None = None   # (TTFT, TPOT) s the bench run was judged by
    deployment: dict | None = None           # what served it (client.bench compare records it)

    def __post_init__(self) -> None:
        if not self.arrivals:
            raise ValueError(f"{self.source}: the trace has no requests")
        if len(self.arrivals) != len(self.lengths):
            raise ValueError(f"{self.source}: {len(self.arrivals)} arrivals, {len(self.lengths)} lengths")

    @property
    def num_requests(self) -> int:
        return len(self.arrivals)

    @property
    def span_s(self) -> float:
        return max(self.arrivals) - min(self.arrivals)

    @property
    def rate(self) -> float:
        """Requests per second over the trace (n - 1 gaps over its span)."""
        n = self.num_requests
        return (n - 1) / self.span_s if n > 1 and self.span_s > 0 else float("inf")

    def requests(self) -> list[Request]:
        t0 = min(self.arrivals)
        return make_requests(self.lengths, [t - t0 for t in self.arrivals])

    def measured_attainment(self, slo: SLO) -> float | None:
        """The attainment the trace's own latencies show (client/bench's definition)."""
        if not self.records or "ttft_s" not in self.records[0]:
            return None
        from client.bench.metrics import SLO as BenchSLO, RequestResult, attainment
        results = [RequestResult.from_json({"index": i, **r}) for i, r in enumerate(self.records)]
        return attainment(results, BenchSLO(slo.ttft, slo.tpot))


def _from_records(records: Sequence[dict], source: str, **extra) -> Trace:
    rows = []
    for i, r in enumerate(records):
        missing = [k for k in FIELDS if r.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{source}: record {i} has no {', '.join(missing)}")
        rows.append((float(r["arrival_s"]), int(r["prompt_len"]), int(r["output_len"])))
    bad = [i for i, (t, p, o) in enumerate(rows) if p < 1 or o < 1 or not math.isfinite(t)]
    if bad:
        raise ValueError(f"{source}: records {bad[:5]} have lengths < 1 or no arrival time")
    keep = tuple(dict(r) for r in records) if records and "ttft_s" in records[0] else ()
    return Trace(tuple(t for t, _, _ in rows), tuple((p, o) for _, p, o in rows), source, keep,
                 **extra)


def _bench_slo(doc: dict) -> tuple[float, float] | None:
    slo = doc.get("slo") or {}
    return (slo["ttft_s"], slo["tpot_s"]) if slo.get("ttft_s") and slo.get("tpot_s") else None


def _pick(items: list[dict], key: Callable[[dict], Any], want: Any, what: str) -> dict:
    """The item whose key is `want` (nearest, for rates); the list of choices in errors."""
    if want is None:
        return items[0]
    if isinstance(want, float):
        return min(items, key=lambda it: abs(math.log(key(it) / want)))
    for it in items:
        if key(it) == want:
            return it
    raise ValueError(f"no {what} {want!r}; have {', '.join(str(key(it)) for it in items)}")


def _from_bench(doc: dict, source: str, rate: float | None, system: str | None) -> Trace:
    """client.bench results: run ('results'), goodput ('points'), compare ('systems')."""
    if "systems" in doc:
        entry = _pick(doc["systems"], lambda s: s["system"]["name"], system, "system")
        name = entry["system"]["name"]
        trace = _from_bench({"slo": doc.get("slo"), **entry}, f"{source} [{name}]", rate, None)
        return replace(trace, deployment=entry["system"].get("deployment"))
    if "points" in doc:
        points = sorted((p for p in doc["points"] if p.get("results")), key=lambda p: -p["rate"])
        if not points:
            raise ValueError(f"{source}: the goodput result has no measured points")
        point = _pick(points, lambda p: p["rate"], rate, "rate")
        rates = ", ".join(f"{p['rate']:.3g}" for p in reversed(points))
        return _from_records(point["results"], f"{source} (the point at {point['rate']:.3g} req/s; "
                             f"measured: {rates})", slo=_bench_slo(doc))
    if "results" in doc:
        return _from_records(doc["results"], source, slo=_bench_slo(doc))
    raise ValueError(f"{source}: a JSON trace needs 'results', 'points', 'systems' or a list of records")


def load_trace(path: str | Path, rate: float | None = None, system: str | None = None) -> Trace:
    """A trace from a client/bench result JSON, a JSON list or JSONL of records, or a CSV.
    Goodput results: the point nearest `rate` (default the highest); compare results: the
    system named `system` (default the first)."""
    path = Path(path)
    text = path.read_text()
    if text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:                     # JSONL: one record per line
            return _from_records([json.loads(ln) for ln in text.splitlines() if ln.strip()], str(path))
        if isinstance(doc, list) or set(FIELDS) <= set(doc):
            return _from_records(doc if isinstance(doc, list) else [doc], str(path))
        return _from_bench(doc, str(path), None if rate is None else float(rate), system)
    rows = list(csv.DictReader(text.splitlines()))
    if rows and not set(FIELDS) <= set(rows[0]):
        raise ValueError(f"{path}: a CSV trace needs the header {','.join(FIELDS)}")
    return _from_records(rows, str(path))


# ---- simulation ------------------------------------------------------------------------------

def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def evaluate(config: SimConfig, trace: Trace, slo: SLO) -> dict[str, Any]:
    """The trace replayed on `config` at its own arrival times."""
    res = Simulator(config, trace.requests()).run()
    att = res.attainment(slo.ttft, slo.tpot)
    ttft = [r.ttft for r in res.records]
    tpot = [r.tpot for r in res.records if r.req.output_len > 1]
    out = {"attainment": att, "meets": att >= slo.target,
           "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
           "tpot_p50_s": _pct(tpot, 50), "tpot_p90_s": _pct(tpot, 90)}
    return out | ({"routes": res.routes()} if config.mode == "adaptive" else {})


def alone_miss(trace: Trace, lat, slo: SLO) -> float:
    """The share of the trace's requests that miss an SLO with an instance to themselves."""
    stages = lat.pp if lat.pp != lat.measured_pp else 1     # derived pp: times are per stage
    miss = [stages * lat.prefill_time([p]) > slo.ttft
            or (o > 1 and stages * lat.decode_time(1, p + 1) > slo.tpot) for p, o in trace.lengths]
    return sum(miss) / len(miss)


def config_goodput(planner: Planner, config: SimConfig, guess: float) -> float:
    """Poisson goodput of a whole deployment on the planner's lengths."""
    scale = max(1, (config.num_prefill + config.num_decode) // 2)
    return goodput(planner.probe(config, scale), planner.slo.target, guess, planner.space.rel_tol)


def size_for_rate(planner: Planner, trace: Trace, max_grow: int = 8) -> dict[str, Any] | None:
    """Algorithm 1's replication at the trace's rate, then grown until the trace meets the target."""
    pres, decs = planner.phase_choices("prefill"), planner.phase_choices("decode")
    if not pres or not decs or not math.isfinite(trace.rate):
        return None
    p, d = pres[0], decs[0]
    space, cluster = planner.space, planner.cluster
    specs = (space.instance(cluster.device, p.tp, p.pp), space.instance(cluster.device, d.tp, d.pp))

    def run(n: int, m: int) -> dict[str, Any]:
        cfg = SimConfig("disaggregated", *specs, n, m, cluster.intra_link, space.kv_bytes_per_token)
        return {"num_prefill": n, "num_decode": m,
                "num_devices": n * p.num_devices + m * d.num_devices, "trace": evaluate(cfg, trace, planner.slo)}

    best = run(max(1, math.ceil(trace.rate / p.goodput)), max(1, math.ceil(trace.rate / d.goodput)))
    grown = 0
    while not best["trace"]["meets"] and grown < max_grow:
        n, m = best["num_prefill"], best["num_decode"]
        best = max(run(n + 1, m), run(n, m + 1),
                   key=lambda c: (c["trace"]["attainment"], -c["num_devices"]))
        grown += 1
    return {"prefill": asdict(p), "decode": asdict(d), **best, "grown": grown}


def _current(dep, target: Target, planner: Planner, trace: Trace, mode: str) -> dict[str, Any]:
    out = {}
    guess = trace.rate if math.isfinite(trace.rate) else 1.0
    for system, config in deployment_configs(dep, target, mode).items():
        disagg = config.mode != "colocated"
        out[system] = {"num_prefill": config.num_prefill, "num_decode": config.num_decode if disagg else 0,
                       "tp_prefill": config.prefill.latency.tp,
                       "tp_decode": config.decode.latency.tp if disagg else None,
                       "trace": evaluate(config, trace, planner.slo),
                       "goodput": config_goodput(planner, config, guess)}
    return out


def _chosen(planner: Planner, trace: Trace, current: dict[str, Any]) -> dict[str, Any] | None:
    best = best_of(search(planner))
    if best is None:
        return None
    units = best.num_units if best.algorithm == "low" else 1
    shape = (best.num_prefill * units, best.num_decode * units, best.prefill.num_devices,
             best.decode.num_devices)
    cur = current.get("disaggregated")
    same = cur is not None and shape == (cur["num_prefill"], cur["num_decode"], cur["tp_prefill"],
                                         cur["tp_decode"])
    return {**asdict(best), "per_device": best.per_device, "same_as_current": same,
            "trace": evaluate(placement_config(planner, best), trace, planner.slo)}


def _colocated(planner: Planner, target: Target, trace: Trace) -> dict[str, Any] | None:
    """The colocated baseline on the same devices, from the same profile (our engine)."""
    colo = plan_colocated(planner, target.table)
    if colo is None:
        return None
    return {**asdict(colo), "per_device": colo.per_device,
            "trace": evaluate(placement_config(planner, colo), trace, planner.slo)}


def _modes(dep, target: Target, planner: Planner, trace: Trace, mode: str,
           modes: Sequence[str] | None = None) -> dict[str, Any]:
    """The deployment's devices served each way (those of `modes`, and its own): goodput and
    the trace, and the advice."""
    guess = trace.rate if math.isfinite(trace.rate) else 1.0
    found = {m: {"trace": evaluate(config, trace, planner.slo),
                 "goodput": config_goodput(planner, config, guess)}
             for m, config in same_devices(dep, target, planner.slo).items()
             if modes is None or m in modes or m == mode}
    return {"by_mode": found, **recommend(mode, found)}


def replan(dep, target: Target, trace: Trace, planner_for: Callable[[list], Planner],
           plan: bool = True, max_grow: int = 8, mode: str | None = None,
           modes: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole report as a dict (see the module docstring); `mode`: how `dep` is served
    (default: deployment_mode); `modes`: the other ways to serve its devices to weigh
    (planner.modes.PLAN_MODES; default: all)."""
    mode = deployment_mode(dep, mode)
    planner = planner_for(list(trace.lengths))
    slo = planner.slo
    doc: dict[str, Any] = {
        "trace": {"source": trace.source, "num_requests": trace.num_requests, "span_s": trace.span_s,
                  "rate": trace.rate, "mean_prompt": float(np.mean([p for p, _ in trace.lengths])),
                  "mean_output": float(np.mean([o for _, o in trace.lengths])),
                  "measured_attainment": trace.measured_attainment(slo)},
        "slo": asdict(slo), "model": target.model, "device": target.device,
        "deployment": {"cores": describe_cores(dep), "systems": list(dep.systems), "mode": mode}}
    doc["current"] = _current(dep, target, planner, trace, mode)
    doc["trace"]["alone_miss"] = alone_miss(trace, target.table.get(target.model, target.device, 1), slo)
    if plan:
        doc["planner"] = {"devices": f"{planner.cluster.num_nodes}x{planner.cluster.gpus_per_node}",
                          "chosen": _chosen(planner, trace, doc["current"]),
                          "colocated": _colocated(planner, target, trace) if target.measured_here else None}
        doc["sized_for_trace"] = size_for_rate(planner, trace, max_grow)
    doc["modes"] = _modes(dep, target, planner, trace, mode, modes)
    doc["num_sims"] = planner.num_sims
    return doc


# ---- the report --------------------------------------------------------------------------------

def _ev(ev: dict[str, Any]) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.0f}"    # noqa: E731
    return (f"attainment {100 * ev['attainment']:.1f}% (TTFT p50/p90 {ms(ev['ttft_p50_s'])}/"
            f"{ms(ev['ttft_p90_s'])} ms, TPOT p50/p90 {ms(ev['tpot_p50_s'])}/{ms(ev['tpot_p90_s'])} ms)")


def _shape(d: dict) -> str:
    return f"tp{d['tp']} pp{d['pp']}"


def report(doc: dict[str, Any]) -> str:
    t, slo = doc["trace"], doc["slo"]
    lines = [f"trace: {t['source']}: {t['num_requests']} requests over {t['span_s']:.1f} s = "
             f"{t['rate']:.3g} req/s; mean prompt {t['mean_prompt']:.0f}, output {t['mean_output']:.0f}",
             f"SLO: TTFT {slo['ttft']:g} s, TPOT {slo['tpot']:g} s, target {100 * slo['target']:.0f}%"
             f" ({doc['model']} on {doc['device']})"]
    if t["measured_attainment"] is not None:
        lines.append(f"measured on the real system: attainment {100 * t['measured_attainment']:.1f}%")
    lines.append(f"current deployment ({doc['deployment']['cores']}):")
    for system, c in doc["current"].items():
        verdict = "MEETS the target" if c["trace"]["meets"] else "MISSES the target"
        headroom = (f"goodput {c['goodput']:.3g} req/s, the trace runs at "
                    f"{100 * t['rate'] / c['goodput']:.0f}% of it" if c["goodput"] else
                    "goodput 0: no rate reaches the target with these lengths")
        shape = (f"{c['num_prefill']} prefill + {c['num_decode']} decode" if c["num_decode"]
                 else f"{c['num_prefill']} colocated")
        lines.append(f"  {system} ({shape}): simulated {_ev(c['trace'])}: {verdict}; {headroom}")
    if t["alone_miss"] > 1 - slo["target"]:
        lines.append(f"  {100 * t['alone_miss']:.0f}% of the trace's requests miss the SLOs even "
                     f"alone on an idle instance (a prompt's prefill over the TTFT, or one decode "
                     f"step over the TPOT): more of these devices cannot reach the target; faster "
                     f"ones (tp) or looser SLOs can")
    if "planner" in doc:
        ch = doc["planner"]["chosen"]
        if ch is None:
            lines.append(f"planner on {doc['planner']['devices']}: no placement reaches the target "
                         "at any rate")
        else:
            units = ch["num_units"] if ch["algorithm"] == "low" else 1
            same = " (the current deployment)" if ch["same_as_current"] else ""
            lines.append(f"planner on {doc['planner']['devices']}: {ch['algorithm']} affinity, "
                         f"{ch['num_prefill'] * units} prefill {_shape(ch['prefill'])} + "
                         f"{ch['num_decode'] * units} decode {_shape(ch['decode'])}{same} "
                         f"({ch['num_devices']} devices), goodput {ch['goodput']:.3g} req/s; "
                         f"on the trace: {_ev(ch['trace'])}")
        colo = doc["planner"]["colocated"]
        if colo is not None:
            lines.append(f"colocated baseline on {doc['planner']['devices']}: {colo['num_prefill']} x "
                         f"{_shape(colo['prefill'])}, goodput {colo['goodput']:.3g} req/s; on the "
                         f"trace: {_ev(colo['trace'])}")
        s = doc["sized_for_trace"]
        if s is not None:
            verdict = "meets" if s["trace"]["meets"] else f"still misses after {s['grown']} additions"
            lines.append(f"sized for {t['rate']:.3g} req/s: {s['num_prefill']} prefill "
                         f"{_shape(s['prefill'])} (goodput {s['prefill']['goodput']:.3g} each) + "
                         f"{s['num_decode']} decode {_shape(s['decode'])} (goodput "
                         f"{s['decode']['goodput']:.3g} each) = {s['num_devices']} devices; on the "
                         f"trace: {_ev(s['trace'])}: {verdict}")
    lines += _report_modes(doc["modes"], doc["deployment"]["cores"])
    return "\n".join(lines)


def _report_modes(m: dict[str, Any], cores: str) -> list[str]:
    lines = [f"modes on the deployment's devices ({cores}):"]
    for mode, found in m["by_mode"].items():
        current = " (current)" if mode == m["current"] else ""
        routes = found["trace"].get("routes")
        routed = (f"; routed {routes['split']} split, {routes['local']} local, {routes['waited']} "
                  "held first" if routes else "")
        lines.append(f"  {mode}{current}: goodput {found['goodput']:.3g} req/s; on the trace: "
                     f"{_ev(found['trace'])}{routed}")
    if m["recommend"]:
        lines.append(f"mode: serve as {m['recommend']} instead of {m['current']} ({m['why']})")
    else:
        lines.append(f"mode: keep {m['current']} ({m['why']})")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="client/bench result JSON, JSON/JSONL records, or CSV")
    p.add_argument("--deployment", help="the deployment JSON being served (default: the one a "
                                        "client.bench compare result records)")
    p.add_argument("--system", help="compare results: which system's trace (default: the first)")
    p.add_argument("--rate", type=float, default=None,
                   help="goodput results: the point nearest this rate (default: the highest)")
    p.add_argument("--grow", type=int, default=8, help="max instances added when sizing for the trace")
    p.add_argument("--no-search", action="store_true", help="only check the current deployment")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--modes", type=parse_modes, default=None,
                   help="the ways to serve the same devices to weigh (comma-separated: split, "
                        "adaptive, adaptive-shared, colocated; default: all)")


def cmd_replan(args: argparse.Namespace, target: Target, planner_for: Callable[[list], Planner]) -> int:
    """`planner_for(lengths)` reads args.ttft/tpot/devices when called (filled in here)."""
    from deploy.deployment import Deployment
    trace = load_trace(args.trace, args.rate, args.system)
    mode = None
    if args.deployment:
        dep, mode = load_deployment(args.deployment, check_host=False)
    elif trace.deployment is not None:
        recorded = dict(trace.deployment)
        mode = recorded.pop("mode", None)
        dep = Deployment.from_dict(recorded, check_host=False)
    else:
        raise SystemExit("replan: give --deployment (the trace does not say what served it)")
    if args.ttft is None or args.tpot is None:
        if trace.slo is None:
            raise SystemExit("replan: give --ttft and --tpot (the trace records no SLO)")
        args.ttft = args.ttft or trace.slo[0]
        args.tpot = args.tpot or trace.slo[1]
    if args.devices is None and dep.prefill.device == "cpu":
        used = set().union(*(ph.all_devices() for ph in dep.phases().values()))
        args.devices = f"1x{len(used)}"
    doc = replan(dep, target, trace, planner_for, plan=not args.no_search, max_grow=args.grow, mode=mode,
                 modes=args.modes)
    print(report(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0
