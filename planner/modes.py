"""How to serve: pure split, adaptive or colocated, for a workload and SLOs (issue 12, item 5).

- split: every prompt on a prefill instance, its KV handed to a decode instance (DistServe).
- adaptive: the same instances; each request routed by backends.core.router.route (split, or
  prefilled locally in chunks inside a decode instance's steps), simulated by
  SimConfig.adaptive (planner/sim_routing.py).
- adaptive-shared: adaptive, plus one decode instance on each prefill instance's cores
  (planner.deployment.with_decode_on_prefill_cores; the router takes a local option that meets
  both SLOs first). The simulator time-slices the shared cores (SimConfig.shared). Offered
  where prefill and decode instances are alike in size (same tp, pp 1).
- colocated: every instance runs both phases (plan_colocated, the vLLM-style baseline).

A disaggregated placement's split and adaptive goodputs are searched on the deployment its
goodput was checked on (planner.placement.checked_on: a slice of a high node-affinity
placement, one unit of a low one) with the same probes, from its checked goodput, and scaled to
the whole placement. The plan serves the candidate with the highest goodput per device; ties
go to the simpler mode (split, then colocated, then adaptive).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

from planner.placement import checked_on
from planner.search import Placement, Planner, goodput
from planner.simulator import SimConfig

SIMPLER_FIRST = ("split", "colocated", "adaptive", "adaptive-shared")
PLAN_MODES = ("split", "adaptive", "adaptive-shared", "colocated")


def mode_goodputs(planner: Planner, placement: Placement,
                  modes: Sequence[str] = ("split", "adaptive")) -> dict[str, float]:
    """Goodput of a disaggregated placement served each way (req/s of the whole placement)."""
    config, factor = checked_on(planner, placement)
    configs = {"split": config, "adaptive": config.adaptive(planner.slo)}
    if "adaptive-shared" in modes and can_share(placement):
        configs["adaptive-shared"] = config.shared().adaptive(planner.slo)
    modes = [m for m in modes if m in configs]
    guess = max(placement.goodput / factor, 1e-3)
    scale = config.num_prefill + config.num_decode
    return {mode: factor * goodput(planner.probe(configs[mode], scale), planner.slo.target, guess,
                                   planner.space.rel_tol, step=1.3)
            for mode in modes}


def can_share(placement: Placement) -> bool:
    """A decode instance fits on a prefill instance's devices: the same tp, no pipeline."""
    return placement.decode is not None and placement.prefill.pp == placement.decode.pp == 1 \
        and placement.prefill.tp == placement.decode.tp


def serve_modes(planner: Planner, placement: Placement,
                modes: Sequence[str] = ("split", "adaptive")) -> list[Placement]:
    """The placement once per mode (adaptive-shared: where `can_share`), each with its goodput
    (the placement's own check kept in notes as `checked_goodput`)."""
    found = mode_goodputs(planner, placement, [m for m in modes if m != "colocated"])
    return [replace(placement, mode="adaptive" if mode == "adaptive-shared" else mode,
                    shared_cores=mode == "adaptive-shared", goodput=g,
                    notes={**placement.notes, "checked_goodput": placement.goodput})
            for mode, g in found.items()]


def choose(candidates: Iterable[Placement | None]) -> Placement | None:
    """The highest goodput per device, then the higher goodput, then the simpler mode."""
    return max((c for c in candidates if c is not None),
               key=lambda c: (c.per_device, c.goodput, -SIMPLER_FIRST.index(c.label)), default=None)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in PLAN_MODES]
    if not modes or bad:
        raise ValueError(f"modes must be names from {PLAN_MODES}, got {text!r}")
    return modes


# ---- replan: the same devices served another way ------------------------------------------

MODE_GAIN = 1.1         # replan recommends another mode from 10% more goodput on the same devices


def same_devices(dep, target, slo) -> dict[str, SimConfig]:
    """A deploy.deployment.Deployment's devices served each way: split and adaptive over its
    prefill and decode phases, colocated over its colocated phase if it has one, else one
    colocated instance per prefill and decode instance (their cores, the decode phase's
    limits and the prefill phase's token budget, as deploy.deployment.colocated_deployment)."""
    from deploy.deployment import PhaseSpec
    from planner.deployment import deployment_configs
    split_dep = replace(dep, systems=("disaggregated",), colocated=None)
    out = {"split": deployment_configs(split_dep, target)["disaggregated"]}
    out["adaptive"] = out["split"].adaptive(slo)
    split = out["split"]
    if not split.num_shared_decode and split.prefill.latency.tp == split.decode.latency.tp and \
            split.prefill.latency.pp == split.decode.latency.pp == 1:
        out["adaptive-shared"] = split.shared().adaptive(slo)
    devices = tuple(dict.fromkeys(dep.prefill.devices + dep.decode.devices))   # shared ones once
    colocated = dep.colocated or PhaseSpec(
        device=dep.decode.device, num_instances=len(devices),
        devices=devices, num_kv_blocks=dep.decode.num_kv_blocks,
        max_num_seqs=dep.decode.max_num_seqs, max_num_batched_tokens=dep.prefill.max_num_batched_tokens)
    try:
        out["colocated"] = deployment_configs(replace(dep, colocated=colocated, systems=("colocated",)),
                                              target)["colocated"]
    except ValueError:                  # instances of different core counts: no one colocated kind
        pass
    return out


def recommend(current: str, found: dict[str, dict]) -> dict:
    """From each mode's {"goodput", "trace": {"meets", ...}} on the same devices: the mode to
    serve instead of `current`, if one pays (MODE_GAIN x its goodput, or it meets the target on
    the trace where `current` does not), with why."""
    cur = found[current]
    best = max(found, key=lambda m: (found[m]["goodput"], found[m]["trace"]["attainment"],
                                     -SIMPLER_FIRST.index(m)))
    gain = found[best]["goodput"] / cur["goodput"] if cur["goodput"] else float("inf")
    rescues = [m for m in found if found[m]["trace"]["meets"] and not cur["trace"]["meets"]]
    if best != current and gain >= MODE_GAIN:
        pick, why = best, f"{gain:.2f}x the goodput of {current} on these devices"
    elif rescues:
        pick = max(rescues, key=lambda m: (found[m]["trace"]["attainment"], found[m]["goodput"]))
        why = f"meets the target on the trace, {current} does not"
    else:
        pick, why = None, f"no mode gains {100 * (MODE_GAIN - 1):.0f}% over {current}"
    return {"current": current, "best": best, "gain": gain, "recommend": pick, "why": why}
