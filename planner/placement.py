"""The placement algorithms over a Planner: high node-affinity, low node-affinity, and the
colocated baseline (one engine does both phases, vLLM-style).

A placement's goodput is predicted from its phases' goodputs (each simulated alone) and then
checked by simulating the deployment whole (prefill and decode together, with KV transfers):
the check starts at the prediction and can only lower it (bisecting down), over a shorter
window (`verify_lifetimes`), since the slow decode memory cliff is already in the phases'."""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.latency import LatencyTable, Link
from planner.search import Cluster, PhaseChoice, Placement, Planner, decode_fluid_rate, goodput
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


def _verify(planner: Planner, config: SimConfig, rate: float) -> float:
    """The deployment's simulated goodput, at most `rate` (its prediction)."""
    probe = planner.probe(config, scale=config.num_prefill + config.num_decode, verify=True)
    return goodput(probe, planner.slo.target, rate, planner.space.verify_rel_tol, max_probes=6,
                   step=1.15, max_rate=rate)


def _config(planner: Planner, p: PhaseChoice, d: PhaseChoice, n: int, m: int, link) -> SimConfig:
    space, device = planner.space, planner.cluster.device
    return SimConfig("disaggregated", space.instance(device, p.tp, p.pp),
                     space.instance(device, d.tp, d.pp, decode=True), n, m, link, space.kv_bytes_per_token)


def _slice(n: int, m: int, max_instances: int = 8) -> tuple[int, int]:
    """The smallest group with the ratio n:m, or, when that is big, 1 prefill and its share
    of the decode instances."""
    g = math.gcd(n, m)
    if (n + m) // g <= max_instances:
        return n // g, m // g
    return 1, max(1, round(m / n))


def _high_link(cluster: Cluster) -> Link:
    return cluster.inter_link if cluster.num_nodes > 1 else cluster.intra_link


def checked_on(planner: Planner, placement: Placement) -> tuple[SimConfig, float]:
    """The deployment a disaggregated placement's goodput was simulated on (a slice of a high
    node-affinity placement, one unit of a low one) and the factor from its goodput to the
    whole placement's."""
    p, d, n, m = placement.prefill, placement.decode, placement.num_prefill, placement.num_decode
    if d is None:
        raise ValueError("a colocated placement has no disaggregated deployment")
    if placement.algorithm == "low":
        return _config(planner, p, d, n, m, planner.cluster.intra_link), placement.num_units
    sn, sm = _slice(n, m)
    factor = placement.notes["predicted_from_phases"] / min(sn * p.goodput, sm * d.goodput)
    return _config(planner, p, d, sn, sm, _high_link(planner.cluster)), factor


def plan_high(planner: Planner) -> Placement | None:
    """Algorithm 1: best config per phase (per device), then replicate to fill the cluster;
    checked on a slice of it (KV over the inter-node link)."""
    p, d = planner.best_choice("prefill"), planner.best_choice("decode")
    if p is None or d is None:
        return None
    cluster = planner.cluster
    n, m, rate = _replicas(p, d, cluster.num_devices)
    if n == 0 or m == 0:
        return None
    sn, sm = _slice(n, m)
    slice_rate = min(sn * p.goodput, sm * d.goodput)
    checked = _verify(planner, _config(planner, p, d, sn, sm, _high_link(cluster)), slice_rate)
    simulated = rate * checked / slice_rate
    return Placement("high", p, d, n, m, 1, simulated, n * p.num_devices + m * d.num_devices,
                     {"predicted_from_phases": rate, "kv_link": "inter-node",
                      "checked_on": f"{sn} prefill + {sm} decode"})


@dataclass(frozen=True)
class _Unit:
    """n prefill + m decode instances on one group of pp nodes."""
    est: float                          # predicted goodput of all units
    exact: bool                         # est from searched goodputs (not a decode bound)
    p: PhaseChoice
    d: PhaseChoice
    n: int
    m: int

    @property
    def num_devices(self) -> int:
        """Devices of one unit (pp nodes)."""
        return self.n * self.p.num_devices + self.m * self.d.num_devices


def _units(planner: Planner, pairs: list[tuple[int, int, int]] | None = None) -> list[_Unit]:
    """Every unit (of the given (tp_p, tp_d, pp) only, searched first, if any), best predicted
    goodput first. A decode goodput not searched yet counts at its bound."""
    cluster, space = planner.cluster, planner.space
    tps = space.table.tps(space.model, cluster.device)
    if pairs is None:
        pairs = [(tp_p, tp_d, pp) for pp in space.pps if pp <= cluster.num_nodes
                 for tp_p in tps for tp_d in tps]
    else:
        planner.prefetch([("decode", tp_d, pp) for _, tp_d, pp in pairs])
    out = []
    for tp_p, tp_d, pp in pairs:
        p = planner.phase_goodput("prefill", tp_p, pp)
        g_d = planner.phase_bound("decode", tp_d, pp)
        if p is None or p.goodput <= 0 or not g_d:
            continue
        d, num_units = PhaseChoice(tp_d, pp, g_d), cluster.num_nodes // pp
        for n in range(1, cluster.gpus_per_node // tp_p + 1):
            for m in range(1, (cluster.gpus_per_node - n * tp_p) // tp_d + 1):
                est = num_units * min(n * p.goodput, m * d.goodput)
                out.append(_Unit(est, planner.is_searched("decode", tp_d, pp), p, d, n, m))
    return sorted(out, key=lambda u: (-u.est, u.num_devices))


def _check_unit(planner: Planner, u: _Unit) -> Placement:
    """A unit replicated over the cluster's node groups, simulated whole (one unit)."""
    cluster = planner.cluster
    num_units = cluster.num_nodes // u.p.pp
    unit_rate = _verify(planner, _config(planner, u.p, u.d, u.n, u.m, cluster.intra_link),
                        u.est / num_units)
    return Placement("low", u.p, u.d, u.n, u.m, num_units, num_units * unit_rate,
                     num_units * u.num_devices,
                     {"predicted_from_phases": u.est, "kv_link": "intra-node"})


def plan_low(planner: Planner, top_k: int = 3) -> Placement | None:
    """Algorithm 2: units of pp nodes, stage k of each instance on node k (KV over the
    intra-node link). Branch and bound: the unit predicted best is searched (its decode
    goodput, if still a bound) and then simulated whole; units predicted above the best
    simulated goodput so far are tried next (one n:m per parallelism pair, at most top_k)."""
    cluster = planner.cluster
    planner.prefetch([k for k in planner.phase_keys("prefill") if k[2] <= cluster.num_nodes])
    best, tried = None, set()
    while len(tried) < top_k:
        floor = best.goodput if best else 0.0
        units = [u for u in _units(planner)
                 if u.est > floor * (1 + 1e-9) and (u.p.tp, u.d.tp, u.p.pp) not in tried]
        if not units:
            break
        if not units[0].exact:
            pending = [("decode", u.d.tp, u.d.pp) for u in units if not u.exact]
            planner.prefetch(list(dict.fromkeys(pending))[:max(1, planner.space.workers)])
            continue
        tried.add((units[0].p.tp, units[0].d.tp, units[0].p.pp))
        cand = _check_unit(planner, units[0])
        if best is None or (cand.goodput, cand.per_device) > (best.goodput, best.per_device):
            best = cand
    return best


def plan_fixed(planner: Planner, tp_p: int, tp_d: int, pp: int = 1) -> Placement | None:
    """A low node-affinity placement with the given parallelism for each phase (e.g. a
    published one): its best n:m unit by the phases' goodputs, simulated whole."""
    units = _units(planner, [(tp_p, tp_d, pp)])
    return _check_unit(planner, units[0]) if units else None


def plan_colocated(planner: Planner, table: LatencyTable) -> Placement | None:
    """The baseline: the best tp (pp 1) for one engine doing both phases, replicated. Each tp's
    search starts from 0.7 x its decode-alone fluid rate (interference only lowers it)."""
    cluster, space = planner.cluster, planner.space
    searches, tps = [], []
    for tp in table.tps(space.model, cluster.device):
        spec = space.instance(cluster.device, tp, 1, table=table)
        if spec is None or tp > cluster.gpus_per_node:
            continue
        guess = 0.7 * decode_fluid_rate(spec, planner.lengths, planner.slo)
        searches.append((SimConfig("colocated", prefill=spec), max(guess, 1e-3), 1.2))
        tps.append(tp)
    choices = [PhaseChoice(tp, 1, g) for tp, g in zip(tps, planner.search_many(searches))
               if g is not None]
    if not choices:
        return None
    best = max(choices, key=lambda c: (c.per_device, -c.tp))
    count = cluster.num_devices // best.tp
    return Placement("colocated", best, None, count, 0, 1, count * best.goodput, count * best.tp,
                     {"per_instance_goodput": best.goodput,
                      "per_tp": {c.tp: c.goodput for c in choices}}, mode="colocated")
