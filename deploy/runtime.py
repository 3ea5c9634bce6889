"""What a model.py needs from its Triton `args`: the deployment, its instance index, its cores.

    deployment, phase, index = init_instance(args, "prefill")   # pins a CPU instance

A prefill or decode instance is a model of its own (`prefill_0`, `decode_1`: deploy/contract.py),
so its index is in the model's name, and the model must have that one instance. The colocated
baseline's instances share one model: Triton names instances `<group name>_<index within the
group>`, and a group's default name is `<model>_<group position>`; our configs have one group
per model, so its CPU instances are `colocated_0_0`, `colocated_0_1`, ... GPU instances of one
group share a name and differ by `model_instance_device_id`. No Triton import here: `args` is
the plain dict `initialize` gets.
"""
from __future__ import annotations

import json
import os
from typing import Any

from deploy.contract import INSTANCE_PHASES, model_instance
from deploy.deployment import Deployment, PhaseSpec
from deploy.render import DEPLOYMENT_PARAMETER


def enable_crash_traces() -> None:
    """On a fatal signal (SIGSEGV, SIGBUS, SIGABRT, ...) the stub prints every thread's Python stack
    to stderr (the server log) before it dies. An orchestrator stub died mid-benchmark with a
    segfault inside libpython and left no trace of where (ninth session, multi-turn at 16 users)."""
    import faulthandler
    import sys
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr, all_threads=True)


def deployment_from_config(model_config: str | dict[str, Any], check_host: bool = True) -> Deployment:
    """The Deployment carried in a model config (`args["model_config"]`, JSON text or dict)."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    try:
        text = config["parameters"][DEPLOYMENT_PARAMETER]["string_value"]
    except KeyError:
        raise ValueError(f"model {config.get('name')!r} has no {DEPLOYMENT_PARAMETER!r} parameter in "
                         f"its config.pbtxt; render the repository with `python -m deploy render`") from None
    return Deployment.from_json(text, check_host=check_host)


def instance_index(args: dict[str, Any], phase: PhaseSpec, phase_name: str = "colocated") -> int:
    """This instance's index into `phase.devices` (of phase `phase_name`): a prefill or decode
    instance's from its model's name; ValueError if that does not match the deployment."""
    if phase_name in INSTANCE_PHASES:
        return model_index(args, phase, phase_name)
    if phase.device == "gpu":
        device_id = int(args["model_instance_device_id"])
        if device_id not in phase.devices:
            raise ValueError(f"instance on gpu {device_id}, but the deployment lists gpus "
                             f"{list(phase.devices)}")
        return phase.devices.index(device_id)
    index = parse_instance_name(args["model_instance_name"])[1]
    if index >= phase.num_instances:
        raise ValueError(f"instance {args['model_instance_name']!r} has index {index}, but the "
                         f"deployment has {phase.num_instances} instance(s)")
    return index


def model_index(args: dict[str, Any], phase: PhaseSpec, phase_name: str) -> int:
    """The index in a per-instance model's name (`decode_1` -> 1), checked against the deployment
    and against Triton's instance: the model's only one, on the gpu the deployment gives it."""
    model = args["model_name"]
    named, index = model_instance(model)
    if named != phase_name:
        raise ValueError(f"model {model!r} is a {named} instance's, not a {phase_name} instance's")
    if index >= phase.num_instances:
        raise ValueError(f"model {model!r} is {phase_name} instance {index}, but the deployment has "
                         f"{phase.num_instances} {phase_name} instance(s); render the repository again "
                         "(python -m deploy render)")
    if phase.device == "gpu":
        device_id = int(args["model_instance_device_id"])
        if device_id != phase.gpu(index):
            raise ValueError(f"model {model!r} runs on gpu {device_id}, but the deployment puts "
                             f"{phase_name} instance {index} on gpu {phase.gpu(index)}")
    elif parse_instance_name(args["model_instance_name"]) != (0, 0):
        raise ValueError(f"model {model!r} has instance {args['model_instance_name']!r}: a "
                         "per-instance model has one instance (count: 1)")
    return index


def parse_instance_name(name: str) -> tuple[int, int]:
    """`<model>_<group>_<index>` -> (group, index)."""
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"instance name {name!r} is not <model>_<group>_<index>")
    group, index = int(parts[1]), int(parts[2])
    if group != 0:
        raise ValueError(f"instance {name!r} is in group {group}; rendered configs have one group")
    return group, index


def pin_to_cores(cores: tuple[int, ...] | list[int], num_threads: int) -> None:
    """Pin every thread of this process to `cores` and size torch's thread pool.

    Call before the first torch op: threads created later inherit the affinity.
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except ProcessLookupError:          # the thread ended meanwhile
            continue
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(num_threads)


def init_instance(args: dict[str, Any], phase_name: str) -> tuple[Deployment, PhaseSpec, int]:
    """Read the deployment from `args`, find this instance, pin it if it runs on CPU."""
    deployment = deployment_from_config(args["model_config"])
    phase = deployment.phases()[phase_name]
    index = instance_index(args, phase, phase_name)
    if phase.device == "cpu":
        pin_to_cores(phase.cores(index), phase.threads(index))
    return deployment, phase, index
