"""Render the Triton model repository from a Deployment.

Each model the deployment serves (its `systems`) gets a config.pbtxt from a template,
`deploy/templates/<kind>.pbtxt` (jinja2 with StrictUndefined, so a missing key fails), that
carries the whole deployment as the string parameter "deployment". Every prefill and decode
instance is a model of its own (`prefill_0`, `decode_1`: deploy/contract.py), rendered from its
phase's template with one instance. Their adapter is one file, `ENGINE_ADAPTER` at the top of
the source repository; each such model's `1/model.py` is a relative symlink to it. The other
adapters (`model_repository/<model>/<version>/`, or deploy/baseline_models/) and every top-level
`*.py` of the source repository are copied next to the rendered configs. `distserve_batched`
(a deployment's `batched_front_end`) is rendered from distserve's template and runs distserve's
adapter (`SAME_AS`); only its name and `max_batch_size` (deploy/contract.py) differ.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jinja2

from deploy.contract import (COLOCATED, DECODE, DISTSERVE, DISTSERVE_BATCHED, DISTSERVE_COLOCATED,
                             INSTANCE_PHASES, PREFILL, instance_models, model_instance, model_spec)
from deploy.deployment import ROOT, Deployment, PhaseSpec

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
SRC_REPO = ROOT / "model_repository"
# The kinds of model each system has (a template each); prefill and decode become one model
# per instance (served_models).
SYSTEM_MODELS = {"disaggregated": (DISTSERVE, PREFILL, DECODE),
                 "colocated": (DISTSERVE_COLOCATED, COLOCATED)}
OPTIONAL_MODELS = (DISTSERVE_BATCHED,)              # served when the deployment asks (served_models)
MODELS = tuple(m for models in SYSTEM_MODELS.values() for m in models) + OPTIONAL_MODELS
FRONT_ENDS = (DISTSERVE, DISTSERVE_COLOCATED, DISTSERVE_BATCHED)   # the orchestrators users call
SAME_AS = {DISTSERVE_BATCHED: DISTSERVE}             # a model with another's template and adapter
ENGINE_ADAPTER = "engine_model.py"                  # the per-instance models' one adapter
DEPLOYMENT_PARAMETER = "deployment"
_PLACEHOLDER = re.compile(r"\{\{|\{%|\$\{")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def pbtxt_string(value: str) -> str:
    """`value` as a quoted protobuf text-format string (non-ASCII as octal-escaped UTF-8)."""
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["pbtxt_string"] = pbtxt_string
    return env


def check_no_placeholder(text: str, where: str) -> None:
    match = _PLACEHOLDER.search(text)
    if match:
        line = text.count("\n", 0, match.start()) + 1
        raise ValueError(f"{where}: unrendered placeholder {match.group()!r} on line {line}")


def render_text(template: str, where: str = "<template>", **context: Any) -> str:
    """Render template text strictly: an unknown key raises jinja2.UndefinedError."""
    text = _environment().from_string(template).render(**context)
    check_no_placeholder(text, where)
    return text


def instance_groups(phase: PhaseSpec, index: int | None = None) -> list[dict[str, Any]]:
    """Triton instance groups of a phase's model: with `index`, the one instance `index` (a
    per-instance model: it finds its index in the model's name); without, all of them.

    CPU: one group of `num_instances`; Triton names the instances `<model>_0_<index>` and each
    finds its cores by that index. GPU: one group over the gpu ids, one instance per gpu; each
    finds itself by `model_instance_device_id`.
    """
    if phase.device == "gpu":
        gpus = list(phase.devices) if index is None else [phase.gpu(index)]
        return [{"kind": "KIND_GPU", "count": 1, "gpus": gpus}]
    return [{"kind": "KIND_CPU", "count": phase.num_instances if index is None else 1, "gpus": []}]


def served_phases(deployment: Deployment) -> dict[str, PhaseSpec]:
    """The engine phases of the systems `deployment` serves."""
    phases = deployment.phases()
    return {kind: phases[kind] for system in deployment.systems for kind in SYSTEM_MODELS[system]
            if kind in phases}


def served_models(deployment: Deployment) -> tuple[str, ...]:
    """The models of the systems `deployment` serves (a model per prefill / decode instance)."""
    phases = served_phases(deployment)
    models = tuple(m for system in deployment.systems for kind in SYSTEM_MODELS[system]
                   for m in (instance_models(kind, phases[kind].num_instances)
                             if kind in INSTANCE_PHASES else (kind,)))
    return models + ((DISTSERVE_BATCHED,) if deployment.batched_front_end else ())


def model_kind(model: str) -> str:
    """The template `model` is rendered from: itself, or a per-instance model's phase."""
    if model in MODELS:
        return model
    try:
        return model_instance(model)[0]
    except ValueError:
        raise ValueError(f"unknown model {model!r}: the repository has "
                         f"{[m for m in MODELS if m not in INSTANCE_PHASES]} and "
                         f"{[p + '_<index>' for p in INSTANCE_PHASES]}") from None


def _context(deployment: Deployment, model: str) -> dict[str, Any]:
    kind = model_kind(model)
    if kind in FRONT_ENDS:
        groups = [{"kind": "KIND_CPU", "count": deployment.num_orchestrator_instances, "gpus": []}]
    elif kind in INSTANCE_PHASES:
        groups = instance_groups(deployment.phases()[kind], model_instance(model)[1])
    else:
        groups = instance_groups(deployment.phases()[kind])
    return {"spec": model_spec(model), "kind": SAME_AS.get(kind, kind), "groups": groups,
            "deployment_json": deployment.to_json()}


def render_config(deployment: Deployment, model: str) -> str:
    """The config.pbtxt text of `model` for `deployment`."""
    kind = model_kind(model)
    if model not in served_models(deployment):
        raise ValueError(f"the deployment does not serve {model!r} (systems {list(deployment.systems)}: "
                         f"{list(served_models(deployment))})")
    template = f"{SAME_AS.get(kind, kind)}.pbtxt"
    text = _environment().get_template(template).render(**_context(deployment, model))
    check_no_placeholder(text, f"templates/{template}")
    return text


def render_configs(deployment: Deployment) -> dict[str, str]:
    return {model: render_config(deployment, model) for model in served_models(deployment)}


def write_configs(deployment: Deployment, repo_dir: str | Path) -> None:
    """Write only `<repo_dir>/<model>/config.pbtxt` (how the committed configs are made)."""
    for model, text in render_configs(deployment).items():
        (Path(repo_dir) / model).mkdir(parents=True, exist_ok=True)
        (Path(repo_dir) / model / "config.pbtxt").write_text(text)


# Adapters of models the default deployment does not serve (the colocated baseline) live
# outside model_repository/, so Triton pointed straight at it finds no config-less models.
BASELINE_SRC = Path(__file__).resolve().parent / "baseline_models"


def _code_dir(src_repo: str | Path, model: str) -> Path:
    own = Path(src_repo) / SAME_AS.get(model, model)
    return own if own.is_dir() or not (BASELINE_SRC / model).is_dir() else BASELINE_SRC / model


def _is_engine_model(model: str) -> bool:
    """A per-instance engine model (`decode_1`), or the kind of one (`decode`)."""
    try:
        return model_kind(model) in INSTANCE_PHASES
    except ValueError:
        return False


def _code_file(src_repo: str | Path, model: str) -> Path:
    if _is_engine_model(model):
        return Path(src_repo) / ENGINE_ADAPTER
    return _code_dir(src_repo, model) / "1" / "model.py"


def missing_code(src_repo: str | Path = SRC_REPO, models: tuple[str, ...] = MODELS) -> list[str]:
    """The models whose adapter (`<model>/1/model.py`, or `ENGINE_ADAPTER` for the engine
    instances' models) is missing from `src_repo`."""
    return [m for m in models if not _code_file(src_repo, m).is_file()]


def render_repository(deployment: Deployment, out_dir: str | Path, src_repo: str | Path = SRC_REPO,
                      require_code: bool = False) -> Path:
    """Write a complete model repository for `deployment` into `out_dir`; return `out_dir`.

    Rendered into the source repository itself (how the committed one is made), it writes the
    configs and the engine models' adapter links, and removes per-instance models the
    deployment no longer has.

    Args:
        require_code: raise FileNotFoundError when an adapter's model.py is missing (set it
            when the repository is about to be served).
    """
    out_dir, src_repo = Path(out_dir).resolve(), Path(src_repo).resolve()
    models = served_models(deployment)
    if out_dir == src_repo:
        _remove_models(out_dir, [d.name for d in out_dir.iterdir()
                                 if _is_engine_model(d.name) and d.name not in models + MODELS])
        write_configs(deployment, out_dir)
        _link_engine_adapters(out_dir, models)
        return out_dir
    if require_code and missing_code(src_repo, models):
        raise FileNotFoundError(f"no adapter code for {missing_code(src_repo, models)}: expected "
                                f"{src_repo}/<model>/1/model.py, or {src_repo}/{ENGINE_ADAPTER} "
                                "for the engine instances")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_models(out_dir, [*MODELS, *(d.name for d in out_dir.iterdir() if _is_engine_model(d.name))])
    for model in models:
        _copy_versions(None if _is_engine_model(model) else _code_dir(src_repo, model), out_dir / model)
    write_configs(deployment, out_dir)
    for shared in sorted(src_repo.glob("*.py")):
        shutil.copy2(shared, out_dir / shared.name)
    _link_engine_adapters(out_dir, models)
    return out_dir


def _remove_models(repo: Path, models: list[str]) -> None:
    for model in models:
        shutil.rmtree(repo / model, ignore_errors=True)


def _link_engine_adapters(repo: Path, models: tuple[str, ...]) -> None:
    """`<model>/1/model.py` -> `../../ENGINE_ADAPTER` for each engine instance's model (none
    while the repository has no adapter: the launch check then names it)."""
    if not (repo / ENGINE_ADAPTER).is_file():
        return
    for model in models:
        if _is_engine_model(model):
            link = repo / model / "1" / "model.py"
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path("..") / ".." / ENGINE_ADAPTER)


def _copy_versions(src: Path | None, dst: Path) -> None:
    dst.mkdir(parents=True)
    if src is None or not src.is_dir():
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for version in sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
        shutil.copytree(version, dst / version.name, ignore=ignore)
