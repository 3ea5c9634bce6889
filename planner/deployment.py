"""Between the planner and deploy/: what a latency profile says about the hardware (`Target`),
a Placement as a deploy.deployment.Deployment, and a Deployment as simulator configs.

CPU hosts: a device is a set of cores, so an instance of tp x pp devices gets tp * pp
consecutive cores (core ids counted from 0 across the whole plan; `check_host=False` because
the plan may be for a bigger host; `deploy serve` checks the cores against the host it runs on).

The mode to serve (split | adaptive | colocated, planner/modes.py) is one top-level field of the
deployment JSON the planner writes, "mode", beside deploy.deployment.Deployment's own fields
(save_deployment / load_deployment; a file without it is split, or colocated when it serves
only the colocated system). Colocated plans also say it the way Deployment already can
(systems ["colocated"] and a colocated phase); adaptive has no other field: its decode
instances run mixed (chunked) steps under their max_num_batched_tokens, routed by
backends.core.router with the deployment's slo_ttft_s / slo_tpot_s.
"""
from __future__ import annotations

import warnings

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backends.core.kv_cache import KVLayout
from deploy.deployment import DEFAULT_MODEL_PATH, Deployment, PhaseSpec
from planner.latency import (KV_BYTES_PER_TOKEN, LatencyTable, Link, anchor_path, load_kv_capacity,
                             load_profile, model_key)
from planner.profile import profile_info
from planner.placement import plan_high, plan_low
from planner.search import (SERVE_MODES, SLO, Cluster, Placement, Planner, SearchSpace,
                            decode_step_tokens)
from planner.simulator import InstanceSpec, SimConfig

A100_PROFILE = anchor_path("distserve-a100-profile.distserve.json")
A100_CAPACITY = anchor_path("distserve-a100-max-num-tokens.csv")
A100 = "a100-80gb"
# The published models' KV shapes (layers, KV heads, head_dim); their capacities and bytes are fp16.
PUBLISHED_KV_SHAPES = {"opt-13b": (40, 40, 128), "opt-66b": (64, 72, 128), "opt-175b": (96, 96, 128)}
GIB = 1 << 30


@dataclass(frozen=True)
class Target:
    """The model and device kind a plan is for, with their latency models and KV limits."""
    table: LatencyTable
    model: str
    device: str
    capacity: dict[tuple[str, int, int], int]       # KV tokens per (model, tp, pp)
    kv_bytes_per_token: float
    link: Link | None = None                          # measured KV copy (our profiles)
    info: dict = field(default_factory=dict)          # the profile's own section ({} for A100)
    kv_dtype: str | None = None                       # the KV's dtype, which sets the two above
    kv_blocks: int | None = None                      # KV blocks per instance (our profiles)

    @property
    def measured_here(self) -> bool:
        """A profile of our engine (`python -m planner profile`), not a published table."""
        return bool(self.info)

    def cluster(self, devices: str | None) -> Cluster:
        """'NODESxPER_NODE'; default: this host's cores for our profiles, else 4x8. Our
        profiles' KV link is the intra-node one (the shm copy between instances)."""
        default = f"1x{os.cpu_count() or 1}" if self.measured_here else "4x8"
        cluster = Cluster.parse(devices or default, self.device)
        return replace(cluster, intra_link=self.link) if self.link else cluster

    def instance(self, tp: int, phase: PhaseSpec, block_size: int) -> InstanceSpec:
        """A deployed phase's instance as the simulator sees it."""
        return InstanceSpec(self.table.get(self.model, self.device, tp), phase.limits(block_size))


def load_target(profile: str | Path | None = None, device: str | None = None,
                model: str | None = None, capacity: str | Path | None = None,
                kv_blocks: int = 1024, block_size: int = 16, kv_dtype: str = "auto",
                kv_gib: float | None = None) -> Target:
    """Our profile files name their model and device; the published A100 files hold several
    models (default opt-13b) and take their device kind and KV capacities from outside.
    Without a capacity file, our profiles hold `kv_blocks * block_size` tokens per instance,
    or as many blocks of their KV dtype as `kv_gib` GiB hold. `kv_dtype` ("auto": as profiled,
    fp16 for the published files): the published capacities are fp16 tokens, so the same
    bytes hold fp16-bytes / kv_dtype-bytes times the tokens; our profiles were measured with
    one KV dtype, and another needs its own profile."""
    profile = profile or A100_PROFILE
    info = profile_info(profile)
    device = device or info.get("device") or A100
    table = load_profile(profile, device)
    model = model_key(model or info.get("model") or "opt-13b")
    if info:
        kv_dtype = _profiled_kv_dtype(profile, info, kv_dtype)
        kv = float(info.get("kv_bytes_per_token", 0.0))
        if kv_gib is not None:
            kv_blocks = kv_blocks_in(kv_gib, kv * block_size)
    else:
        kv_dtype = "float16" if kv_dtype == "auto" else kv_dtype
        kv = published_kv_bytes_per_token(model, kv_dtype)
    if capacity is not None or not info:
        caps = load_kv_capacity(capacity or A100_CAPACITY)
        caps = caps if capacity is not None else _published_capacity(caps, kv_dtype)
    else:
        caps = {(model, tp, pp): kv_blocks * block_size
                for tp in table.tps(model, device) for pp in (1, 2, 4, 8)}
    link = Link(**info["kv_link"]) if "kv_link" in info else None
    return Target(table, model, device, caps, kv, link, info, kv_dtype, kv_blocks if info else None)


def kv_blocks_in(gib: float, block_nbytes: float) -> int:
    """KV blocks of `block_nbytes` bytes that `gib` GiB hold (at least one)."""
    if not gib > 0 or not block_nbytes > 0:
        raise ValueError(f"need a KV budget > 0 GiB and blocks of > 0 bytes, got {gib}, {block_nbytes}")
    return max(1, int(gib * GIB // block_nbytes))


def published_kv_bytes_per_token(model: str, kv_dtype: str = "float16") -> float:
    """KV bytes per token of a published model held as `kv_dtype` (int8: its scales included)."""
    if model not in PUBLISHED_KV_SHAPES:
        return float(KV_BYTES_PER_TOKEN.get(model, 0.0)) if kv_dtype == "float16" else 0.0
    layers, heads, head_dim = PUBLISHED_KV_SHAPES[model]
    return KVLayout(1, layers, 16, heads, head_dim, kv_dtype).token_nbytes


Capacity = dict[tuple[str, int, int], int]        # KV tokens per (model, tp, pp)


def _published_capacity(caps: Capacity, kv_dtype: str) -> Capacity:
    out = {}
    for (model, tp, pp), tokens in caps.items():
        held = published_kv_bytes_per_token(model, kv_dtype)
        out[(model, tp, pp)] = int(tokens * published_kv_bytes_per_token(model) / held) if held else tokens
    return out


def _profiled_kv_dtype(profile: str | Path, info: dict, kv_dtype: str) -> str:
    profiled = info.get("kv_dtype", info.get("dtype", "bfloat16"))
    if kv_dtype not in ("auto", profiled):
        raise ValueError(f"{profile} was profiled with {profiled} KV, not {kv_dtype}: decode steps "
                         f"cost differently; profile again with --kv-dtype {kv_dtype}")
    return profiled


def make_planner(target: Target, lengths, slo, devices: str | None, **space) -> Planner:
    """A Planner over `target`'s table; `space` are SearchSpace fields (pps, budgets...)."""
    return Planner(SearchSpace(target.model, target.table, target.capacity,
                               kv_bytes_per_token=target.kv_bytes_per_token, **space),
                   lengths, slo, target.cluster(devices))


def search(planner: Planner, algorithm: str = "both") -> dict[str, Placement | None]:
    """The paper's placement algorithms: "low" and/or "high" node-affinity."""
    plans = {}
    if algorithm in ("low", "both"):
        plans["low"] = plan_low(planner)
    if algorithm in ("high", "both"):
        plans["high"] = plan_high(planner)
    return plans


def best_of(plans: dict[str, Placement | None]) -> Placement | None:
    """The highest goodput per device (then the highest goodput)."""
    return max((p for p in plans.values() if p), key=lambda p: (p.per_device, p.goodput), default=None)


def placement_config(planner: Planner, p: Placement) -> SimConfig:
    """The whole placement as one simulated deployment (a low-affinity plan's units pooled),
    served in its mode."""
    space, cluster = planner.space, planner.cluster
    units = p.num_units if p.algorithm == "low" else 1
    if p.decode is None:
        return SimConfig("colocated", prefill=space.instance(cluster.device, p.prefill.tp, 1),
                         num_prefill=p.num_prefill)
    link = cluster.inter_link if p.algorithm == "high" and cluster.num_nodes > 1 else cluster.intra_link
    config = SimConfig("disaggregated", space.instance(cluster.device, p.prefill.tp, p.prefill.pp),
                       space.instance(cluster.device, p.decode.tp, p.decode.pp, decode=True),
                       p.num_prefill * units, p.num_decode * units, link, space.kv_bytes_per_token)
    if p.shared_cores:
        config = config.shared()
    return config.adaptive(planner.slo) if p.mode == "adaptive" else config


# ---- plan -> deployment ----------------------------------------------------------------------

def _core_sets(start: int, count: int, size: int) -> tuple[tuple[tuple[int, ...], ...], int]:
    sets = tuple(tuple(range(start + i * size, start + (i + 1) * size)) for i in range(count))
    return sets, start + count * size


def to_deployment(p: Placement, model_path: str = DEFAULT_MODEL_PATH, num_kv_blocks: int = 1024,
                  max_num_seqs: int = 32, prefill_budget: int = 2048, dtype: str = "bfloat16",
                  block_size: int = 16, kv_dtype: str = "auto", slo: SLO | None = None,
                  speculative: tuple[str, int] | None = None) -> Deployment:
    """The Deployment that serves `p` (its mode goes beside it: save_deployment). A colocated
    placement serves only the colocated system; its prefill and decode phases (required
    fields, not served) sit on its first and last instance's cores. `speculative`: (drafter,
    k) of the decode and colocated instances."""
    common = dict(device="cpu", num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=prefill_budget)
    spec = {} if speculative is None else {"speculative": speculative[0],
                                           "num_speculative_tokens": speculative[1]}
    extra: dict[str, Any] = {} if slo is None else {"slo_ttft_s": slo.ttft, "slo_tpot_s": slo.tpot}
    if p.decode is None:
        cores, _ = _core_sets(0, p.num_prefill, p.prefill.num_devices)
        return Deployment(model_path=model_path, dtype=dtype, kv_dtype=kv_dtype, block_size=block_size,
                          prefill=PhaseSpec(devices=(cores[0],), **common),
                          decode=PhaseSpec(devices=(cores[-1],), **common),
                          colocated=PhaseSpec(num_instances=len(cores), devices=cores, **common, **spec),
                          systems=("colocated",), check_host=False, **extra)
    units = p.num_units if p.algorithm == "low" else 1
    n, m = p.num_prefill * units, p.num_decode * units
    prefill_cores, nxt = _core_sets(0, n, p.prefill.num_devices)
    decode_cores, _ = _core_sets(nxt, m, p.decode.num_devices)
    dep = Deployment(model_path=model_path, dtype=dtype, kv_dtype=kv_dtype, block_size=block_size,
                     prefill=PhaseSpec(num_instances=n, devices=prefill_cores, **common),
                     decode=PhaseSpec(num_instances=m, devices=decode_cores,
                                      **{**common, "max_num_batched_tokens": decode_step_tokens(max_num_seqs)},
                                      **spec),
                     check_host=False, **extra)
    return with_decode_on_prefill_cores(dep) if p.shared_cores else dep


def serving(dep: Deployment, mode: str) -> Deployment:
    """`dep` set to serve `mode` (Deployment.mode; adaptive: its decode instances run mixed
    steps, each sized to the TPOT SLO by the router's rule)."""
    if mode == "adaptive":
        dep = replace(dep, decode=replace(dep.decode, chunked_prefill=True))
    return replace(dep, mode=mode)


def with_decode_on_prefill_cores(dep: Deployment) -> Deployment:
    """`dep` plus one decode instance on each prefill instance's cores: where prefill idles,
    its cores decode too (the "reverse" of local prefill; the router sends work there by the
    instances' published load). Prefill and that decode instance then share the cores (the
    OS time-slices them): a warning, as for any overlap."""
    if dep.prefill is None or dep.decode is None or dep.prefill.device != dep.decode.device:
        raise ValueError("needs prefill and decode phases on the same kind of device")
    extra = tuple(dep.prefill.devices)
    decode = replace(dep.decode, num_instances=dep.decode.num_instances + len(extra),
                     devices=tuple(dep.decode.devices) + extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # the overlap is the point
        return replace(dep, decode=decode)


def save_deployment(dep: Deployment, mode: str, path: str | Path) -> None:
    """The deployment serving `mode`, as JSON (its top-level "mode" field)."""
    serving(dep, mode).save(path)


def deployment_mode(dep: Deployment, mode: str | None = None) -> str:
    """The mode a deployment serves: `mode` if given, else its own."""
    if mode is None:
        return dep.serving_mode
    if mode not in SERVE_MODES:
        raise ValueError(f"mode must be one of {SERVE_MODES}, got {mode!r}")
    return mode


def load_deployment(path: str | Path, check_host: bool = True) -> tuple[Deployment, str]:
    """A deployment file and the mode it serves."""
    dep = Deployment.load(path, check_host=check_host)
    return dep, dep.serving_mode


# ---- deployment -> simulator ------------------------------------------------------------------

def _tp(phase: PhaseSpec, what: str) -> int:
    """Devices per instance: cores on CPU (torch threads over them), one GPU on GPU hosts."""
    if phase.device == "gpu":
        return 1
    sizes = {len(c) for c in phase.devices}
    if len(sizes) != 1:
        raise ValueError(f"{what}: instances with different core counts {sorted(sizes)} "
                         "cannot be simulated as one kind")
    return sizes.pop()


def _shared_decode(dep: Deployment) -> int:
    """How many decode instances run on a prefill instance's devices (with_decode_on_prefill_cores):
    each on exactly one prefill instance's, one per prefill instance; any other overlap cannot
    be simulated."""
    if dep.prefill.device != dep.decode.device:
        return 0
    pre = [frozenset(d) if isinstance(d, tuple) else frozenset([d]) for d in dep.prefill.devices]
    dec = [frozenset(d) if isinstance(d, tuple) else frozenset([d]) for d in dep.decode.devices]
    shared = [d for d in dec if d in pre]
    if len(set(shared)) != len(shared) or \
            any(d & p for d in dec for p in pre if d not in shared):
        raise ValueError("decode instances overlap prefill instances' devices other than one decode "
                         "instance on exactly one prefill instance's: cannot be simulated")
    if len(shared) == len(dec):
        raise ValueError("every decode instance runs on a prefill instance's devices: cannot be simulated")
    return len(shared)


def deployment_configs(dep: Deployment, target: Target, mode: str = "split") -> dict[str, SimConfig]:
    """One simulator config per system the deployment serves ('disaggregated', 'colocated');
    `mode` adaptive: the disaggregated one served adaptively with the deployment's SLOs."""
    out = {}
    bs = dep.block_size
    kv_dtype = dep.dtype if dep.kv_dtype == "auto" else dep.kv_dtype
    if target.measured_here and target.kv_dtype not in (None, kv_dtype):
        raise ValueError(f"the deployment holds {kv_dtype} KV, the profile measured {target.kv_dtype} "
                         "KV: its step times and KV bytes do not apply")
    if "disaggregated" in dep.systems:
        pre = target.instance(_tp(dep.prefill, "prefill"), dep.prefill, bs)
        dec = target.instance(_tp(dep.decode, "decode"), dep.decode, bs)
        shared = _shared_decode(dep)
        out["disaggregated"] = SimConfig("disaggregated", pre, dec, dep.prefill.num_instances,
                                         dep.decode.num_instances - shared, target.link,
                                         target.kv_bytes_per_token, num_shared_decode=shared)
        if mode == "adaptive":
            out["disaggregated"] = out["disaggregated"].adaptive(SLO(dep.slo_ttft_s, dep.slo_tpot_s))
    if "colocated" in dep.systems:
        spec = target.instance(_tp(dep.colocated, "colocated"), dep.colocated, bs)
        out["colocated"] = SimConfig("colocated", prefill=spec, num_prefill=dep.colocated.num_instances)
    return out


def describe_cores(dep: Deployment) -> str:
    """'prefill [0]; decode [1]': the devices of each instance of each phase served."""
    phases = dep.phases()
    names = (["prefill", "decode"] if "disaggregated" in dep.systems else []) + \
        (["colocated"] if "colocated" in dep.systems else [])
    return "; ".join(f"{name} " + ", ".join(str(list(d)) if isinstance(d, tuple) else str(d)
                                           for d in phases[name].devices) for name in names)
