"""Render the Triton model repository from a Deployment.

Each model the deployment serves (its `systems`) gets a config.pbtxt from
`deploy/templates/<model>.pbtxt` (jinja2 with StrictUndefined, so a missing key fails) that
carries the whole deployment as the string parameter "deployment". The adapters' code
(`model_repository/<model>/<version>/`) and any top-level `*.py` of the source repository are
copied next to the rendered configs.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jinja2

from deploy.contract import COLOCATED, DECODE, DISTSERVE, DISTSERVE_COLOCATED, MODEL_SPECS, PREFILL
from deploy.deployment import ROOT, Deployment, PhaseSpec

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
SRC_REPO = ROOT / "model_repository"
SYSTEM_MODELS = {"disaggregated": (DISTSERVE, PREFILL, DECODE),
                 "colocated": (DISTSERVE_COLOCATED, COLOCATED)}
MODELS = tuple(m for models in SYSTEM_MODELS.values() for m in models)
FRONT_ENDS = (DISTSERVE, DISTSERVE_COLOCATED)       # the orchestrators users call
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


def instance_groups(phase: PhaseSpec) -> list[dict[str, Any]]:
    """Triton instance groups of a phase.

    CPU: one group of `num_instances`; Triton names the instances `<model>_0_<index>` and each
    finds its cores by that index. GPU: one group over the gpu ids, one instance per gpu; each
    finds itself by `model_instance_device_id`.
    """
    if phase.device == "gpu":
        return [{"kind": "KIND_GPU", "count": 1, "gpus": list(phase.devices)}]
    return [{"kind": "KIND_CPU", "count": phase.num_instances, "gpus": []}]


def served_models(deployment: Deployment) -> tuple[str, ...]:
    """The models of the systems `deployment` serves."""
    return tuple(m for system in deployment.systems for m in SYSTEM_MODELS[system])


def _context(deployment: Deployment, model: str) -> dict[str, Any]:
    if model in FRONT_ENDS:
        groups = [{"kind": "KIND_CPU", "count": deployment.num_orchestrator_instances, "gpus": []}]
    else:
        groups = instance_groups(deployment.phases()[model])
    return {"spec": MODEL_SPECS[model], "groups": groups, "deployment_json": deployment.to_json()}


def render_config(deployment: Deployment, model: str) -> str:
    """The config.pbtxt text of `model` for `deployment`."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; the repository has {MODELS}")
    if model not in served_models(deployment):
        raise ValueError(f"the deployment does not serve {model!r} (systems {list(deployment.systems)})")
    text = _environment().get_template(f"{model}.pbtxt").render(**_context(deployment, model))
    check_no_placeholder(text, f"templates/{model}.pbtxt")
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
    own = Path(src_repo) / model
    return own if own.is_dir() or not (BASELINE_SRC / model).is_dir() else BASELINE_SRC / model


def missing_code(src_repo: str | Path = SRC_REPO, models: tuple[str, ...] = MODELS) -> list[str]:
    """The models whose adapter (`<model>/1/model.py`) is missing from `src_repo`."""
    return [m for m in models if not (_code_dir(src_repo, m) / "1" / "model.py").is_file()]


def render_repository(deployment: Deployment, out_dir: str | Path, src_repo: str | Path = SRC_REPO,
                      require_code: bool = False) -> Path:
    """Write a complete model repository for `deployment` into `out_dir`; return `out_dir`.

    Args:
        require_code: raise FileNotFoundError when an adapter's model.py is missing (set it
            when the repository is about to be served).
    """
    out_dir, src_repo = Path(out_dir).resolve(), Path(src_repo).resolve()
    if out_dir == src_repo:
        write_configs(deployment, out_dir)
        return out_dir
    models = served_models(deployment)
    if require_code and missing_code(src_repo, models):
        raise FileNotFoundError(f"no adapter code for {missing_code(src_repo, models)}: expected "
                                f"{src_repo}/<model>/1/model.py")
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        shutil.rmtree(out_dir / model, ignore_errors=True)
    for model in models:
        _copy_versions(_code_dir(src_repo, model), out_dir / model)
    write_configs(deployment, out_dir)
    for shared in sorted(src_repo.glob("*.py")):
        shutil.copy2(shared, out_dir / shared.name)
    return out_dir


def _copy_versions(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    if not src.is_dir():
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for version in sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
        shutil.copytree(version, dst / version.name, ignore=ignore)
