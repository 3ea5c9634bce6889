"""A Placement as a deploy.deployment.Deployment for CPU hosts: a device is a set of cores, so
an instance of tp x pp devices gets tp * pp consecutive cores (core ids counted from 0 across
the whole plan; `check_host=False` because the plan may be for a bigger host)."""
from __future__ import annotations

from deploy.deployment import DEFAULT_MODEL_PATH, Deployment, PhaseSpec
from planner.search import Placement


def _core_sets(start: int, count: int, size: int) -> tuple[tuple[tuple[int, ...], ...], int]:
    sets = tuple(tuple(range(start + i * size, start + (i + 1) * size)) for i in range(count))
    return sets, start + count * size


def to_deployment(p: Placement, model_path: str = DEFAULT_MODEL_PATH, num_kv_blocks: int = 1024,
                  max_num_seqs: int = 32, prefill_budget: int = 2048) -> Deployment:
    if p.decode is None:
        raise ValueError("a colocated placement has no prefill/decode split to deploy")
    units = p.num_units if p.algorithm == "low" else 1
    n, m = p.num_prefill * units, p.num_decode * units
    prefill_cores, nxt = _core_sets(0, n, p.prefill.num_devices)
    decode_cores, _ = _core_sets(nxt, m, p.decode.num_devices)
    common = dict(device="cpu", num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=prefill_budget)
    return Deployment(model_path=model_path,
                      prefill=PhaseSpec(num_instances=n, devices=prefill_cores, **common),
                      decode=PhaseSpec(num_instances=m, devices=decode_cores, **common),
                      check_host=False)
