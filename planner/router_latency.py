"""The router's predictor (backends.core.router.Predictor) from the planner's fitted latency model.

backends never imports the planner, so the router takes its predictor as a parameter; callers
that hold a `LatencyModel` (the simulator, the orchestrator loading a profile) wrap it here:

    route(prompt_len, max_tokens, slo, prefills, decodes, LatencyModelPredictor(model))

A step is priced as the simulator prices it (`planner.simulator._Engine.step_time`): a mixed
step pays its prompt chunk's prefill plus the decodes' marginal cost (their constant term
overlaps with the prefill's). Times are a batch's latency: pp stage times.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from planner.latency import LatencyModel, model_key

log = logging.getLogger(__name__)
HOST_PROFILE = "results/profile_host.json"    # ./build.sh profile-host: measured on this machine


def host_profile(kv_dtype: str = "auto") -> str:
    """This machine's profile for deployments with `kv_dtype` KV: HOST_PROFILE for bf16 (the
    default deployment's), results/profile_host_<kv_dtype>.json for another (`./build.sh
    profile-host int8`): a decode step's attention cost depends on its KV's dtype."""
    return HOST_PROFILE if kv_dtype in ("auto", "bfloat16") else f"results/profile_host_{kv_dtype}.json"


@dataclass(frozen=True)
class LatencyModelPredictor:
    model: LatencyModel

    def prefill_time(self, prompt_lens: Sequence[int], prefix: int = 0) -> float:
        return self.model.pp * self.model.prefill_time(prompt_lens, [prefix] * len(prompt_lens)) \
            if prompt_lens else 0.0

    def decode_step_time(self, num_seqs: int, total_context: int) -> float:
        return self.model.pp * self.model.decode_time(num_seqs, total_context) if num_seqs else 0.0

    def mixed_step_time(self, num_seqs: int, total_context: int, chunk_tokens: int,
                        prefix: int = 0) -> float:
        if not chunk_tokens:
            return self.decode_step_time(num_seqs, total_context)
        decode = self.model.decode_time(num_seqs, total_context, marginal=True) if num_seqs else 0.0
        return self.model.pp * (self.model.prefill_time([chunk_tokens], [prefix]) + decode)


@dataclass(frozen=True)
class PhasePredictor:
    """Prefill and decode instances of different shapes (tp, pp): a split prompt's prefill is
    priced on the prefill instances' model, decode and mixed steps on the decode instances'
    (`route` takes one predictor; where both phases run the same model, LatencyModelPredictor)."""
    prefill: LatencyModelPredictor
    decode: LatencyModelPredictor

    def prefill_time(self, prompt_lens: Sequence[int], prefix: int = 0) -> float:
        return self.prefill.prefill_time(prompt_lens, prefix)

    def decode_step_time(self, num_seqs: int, total_context: int) -> float:
        return self.decode.decode_step_time(num_seqs, total_context)

    def mixed_step_time(self, num_seqs: int, total_context: int, chunk_tokens: int,
                        prefix: int = 0) -> float:
        return self.decode.mixed_step_time(num_seqs, total_context, chunk_tokens, prefix)


def deployment_predictor(deployment, profile: str | Path) -> PhasePredictor:
    """The router's predictor for `deployment` (deploy.deployment.Deployment) from a latency
    profile measured on this kind of host (`./build.sh profile` -> docs/profile_cpu.json): each
    phase priced on its instances' shape. ValueError if the profile is for another model or
    lacks that shape (the orchestrator then routes without predictions)."""
    from planner.deployment import _tp, load_target
    profile = profile_for_host(profile, kv_dtype=deployment.kv_dtype)
    target = load_target(profile)
    served = model_key(Path(deployment.model_path).name.removesuffix(".gguf"))
    if target.model != served:
        raise ValueError(f"{profile} profiles {target.model}, the deployment serves {served}")
    try:
        pre, dec = (target.instance(_tp(p, name), p, deployment.block_size).latency
                    for name, p in (("prefill", deployment.prefill), ("decode", deployment.decode)))
    except KeyError as e:
        raise ValueError(f"{profile}: {e.args[0]}") from None
    return PhasePredictor(LatencyModelPredictor(pre), LatencyModelPredictor(dec))


def profiled_cpu(profile: str | Path) -> str | None:
    """The CPU a profile of ours was measured on (None: not recorded, or not readable)."""
    return _profiled(profile, "machine", "cpu_model")


def profiled_kv_dtype(profile: str | Path) -> str | None:
    """The KV dtype a profile of ours was measured with (None: not recorded, or not readable)."""
    return _profiled(profile, "kv_dtype")


def _profiled(profile: str | Path, *keys: str) -> str | None:
    try:
        value = json.loads(Path(profile).read_text())["profile"]
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def profile_for_host(profile: str | Path, root: str | Path | None = None, kv_dtype: str = "auto") -> Path:
    """`profile`, unless it was measured on another CPU or with another KV dtype than the
    deployment's (`kv_dtype`; "auto": bf16) and this machine's own (host_profile(kv_dtype),
    under `root`, $DISTSERVE_ROOT or the repository) fits: then that. Step times do not carry
    over between CPUs: the shipped profile is an Intel Xeon's (AMX), where a 130-token prefill
    chunk took 78 ms; on an AMD EPYC (AVX-512 BF16, no AMX) 203 ms, and the router sized mixed
    steps and predicted TTFTs 2-5x too optimistically. Nor between KV dtypes: int8 KV's decode
    steps at 1,000 positions are a fifth shorter. With no profile of this CPU it warns and keeps
    `profile`; with this CPU's of another KV dtype only, it warns and takes that."""
    from planner.profile import ROOT, cpu_model
    here = cpu_model()
    base = Path(root or os.environ.get("DISTSERVE_ROOT") or ROOT)
    kv = "bfloat16" if kv_dtype == "auto" else kv_dtype
    given, own, own_bf16 = Path(profile), base / host_profile(kv_dtype), base / HOST_PROFILE

    def cpu_fits(p: Path, unrecorded_ok: bool = False) -> bool:
        measured = profiled_cpu(p)
        return measured == here or (unrecorded_ok and measured is None)

    def kv_fits(p: Path) -> bool:
        return profiled_kv_dtype(p) in (None, kv)

    if cpu_fits(given, unrecorded_ok=True) and kv_fits(given):
        return given
    if cpu_fits(own) and kv_fits(own):
        log.info("latency profile: %s (this CPU, %s KV) instead of %s", own, kv, profile)
        return own
    for other in (given, own, own_bf16):
        if cpu_fits(other, unrecorded_ok=other is given):
            log.warning("latency profile %s was measured with %s KV, the deployment's is %s: decode "
                        "steps are priced as that KV's (./build.sh profile-host %s measures this one)",
                        other, profiled_kv_dtype(other), kv, kv)
            return other
    log.warning("latency profile %s was measured on %s, this host is %s: predicted step times may "
                "be off by several times (./build.sh profile-host measures this one)",
                profile, profiled_cpu(given), here)
    return given
