"""The placement algorithms over a Planner: high node-affinity, low node-affinity, and the
colocated baseline (one engine does both phases, vLLM-style)."""
from __future__ import annotations

import math

from planner.latency import LatencyTable
from planner.search import PhaseChoice, Placement, Planner, goodput
from planner.simulator import SimConfig


def _replicas(p: PhaseChoice, d: PhaseChoice, num_devices: int) -> tuple[int, int, float]:
    """(n, m, rate) maximising rate = min(n g_p, m g_d) with n p_dev + m d_dev <= devices."""
    best = (0, 0, 0.0)
    for n in range(1, num_devices // p.num_devices + 1):
        left = num_devices - n * p.num_devices
        m = min(left // d.num_devices, math.ceil(n * p.goodput / d.goodput))
        rate = min(n * p.goodput, m * d.goodput)
        if rate > best[2] + 1e-12:
            best = (n, m, rate)
    return best


def _verify(planner: Planner, config: SimConfig, rate: float, scale: int) -> float:
    """Goodput of a whole deployment, searched from its predicted rate downwards."""
    probe = planner.probe(config, scale=1 if scale <= 2 else 2)
    return goodput(probe, planner.slo.target, rate, rel_tol=0.08, max_probes=6)


def plan_high(planner: Planner) -> Placement | None:
    """Algorithm 1: best config per phase, then replicate to fill the cluster."""
    prefills, decodes = planner.phase_choices("prefill"), planner.phase_choices("decode")
    if not prefills or not decodes:
        return None
    p, d = prefills[0], decodes[0]
    cluster = planner.cluster
    n, m, rate = _replicas(p, d, cluster.num_devices)
    if n == 0 or m == 0:
        return None
    space = planner.space
    link = cluster.inter_link if cluster.num_nodes > 1 else cluster.intra_link
    config = SimConfig("disaggregated", space.instance(cluster.device, p.tp, p.pp),
                       space.instance(cluster.device, d.tp, d.pp), n, m, link, space.kv_bytes_per_token)
    simulated = _verify(planner, config, rate, n + m)
    return Placement("high", p, d, n, m, 1, simulated, n * p.num_devices + m * d.num_devices,
                     {"predicted_from_phases": rate, "kv_link": "inter-node"})


def _unit_candidates(planner: Planner) -> list[tuple[float, PhaseChoice, PhaseChoice, int, int]]:
    cluster, space = planner.cluster, planner.space
    tps = space.table.tps(space.model, cluster.device)
    per_node = cluster.gpus_per_node
    out = []
    for pp in space.pps:
        if pp > cluster.num_nodes:
            continue
        units = cluster.num_nodes // pp
        for tp_p in tps:
            for tp_d in tps:
                p = planner.phase_goodput("prefill", tp_p, pp)
                d = planner.phase_goodput("decode", tp_d, pp)
                if p is None or d is None or p.goodput <= 0 or d.goodput <= 0:
                    continue
                for n in range(1, per_node // tp_p + 1):
                    for m in range(1, (per_node - n * tp_p) // tp_d + 1):
                        est = units * min(n * p.goodput, m * d.goodput)
                        out.append((est, p, d, n, m))
    out.sort(key=lambda c: (-c[0], c[3] * c[1].num_devices + c[4] * c[2].num_devices))
    return out


def plan_low(planner: Planner, top_k: int = 3) -> Placement | None:
    """Algorithm 2: units of pp nodes, stage k of each instance on node k; the best few units
    by their per-phase estimate are simulated whole (KV over the intra-node link)."""
    cluster, space = planner.cluster, planner.space
    best, seen = None, set()
    for est, p, d, n, m in _unit_candidates(planner):
        if len(seen) >= top_k:
            break
        if (p.tp, d.tp, p.pp) in seen:          # one n:m per parallelism pair: the best one
            continue
        seen.add((p.tp, d.tp, p.pp))
        units = cluster.num_nodes // p.pp
        config = SimConfig("disaggregated", space.instance(cluster.device, p.tp, p.pp),
                           space.instance(cluster.device, d.tp, d.pp), n, m, cluster.intra_link,
                           space.kv_bytes_per_token)
        unit_rate = _verify(planner, config, est / units, n + m)
        devices = units * p.pp * (n * p.tp + m * d.tp)
        cand = Placement("low", p, d, n, m, units, units * unit_rate, devices,
                         {"predicted_from_phases": est, "kv_link": "intra-node"})
        if best is None or (cand.goodput, cand.per_device) > (best.goodput, best.per_device):
            best = cand
    return best


def plan_colocated(planner: Planner, table: LatencyTable) -> Placement | None:
    """The baseline: the best tp (pp 1) for one engine doing both phases, replicated."""
    cluster, space = planner.cluster, planner.space
    best = None
    for tp in table.tps(space.model, cluster.device):
        spec = space.instance(cluster.device, tp, 1, table=table)
        if spec is None or tp > cluster.gpus_per_node:
            continue
        try:
            g = planner._goodput(SimConfig("colocated", prefill=spec), guess=1.0)
        except ValueError:
            continue
        choice = PhaseChoice(tp, 1, g)
        if best is None or choice.per_device > best.per_device:
            best = choice
    if best is None:
        return None
    count = cluster.num_devices // best.tp
    return Placement("colocated", best, None, count, 0, 1, count * best.goodput, count * best.tp,
                     {"per_instance_goodput": best.goodput})
