"""What a deployment puts in /dev/shm, checked by the launcher (deploy/server.py) before it
starts tritonserver: prefill KV segments, shared weights, python-backend stub regions."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from backends.core.config import ModelConfig
from deploy.contract import PREFILL
from deploy.deployment import Deployment
from deploy.render import DEPLOYMENT_PARAMETER, FRONT_ENDS, served_models, served_phases
from deploy.server_setup import ServerError

SHM_DIR = "/dev/shm"
# The python backend maps one region per stub, shm-default-byte-size to start with (1 MiB unless
# the command sets it) and growing by shm-growth-byte-size (1 MiB) steps as tensors need it; our
# tensors are small (text, token ids, descriptors): the default plus 7 MiB of growth per stub.
STUB_SHM_DEFAULT_BYTES = 1 << 20
STUB_SHM_GROWTH_ALLOWANCE = 7 << 20


# ---- /dev/shm: what a deployment puts there, checked before the server starts -----------------

WEIGHTS_ITEM = "shared weights"
_ROLES = {"prefill": "prefill", "decode": "decode", "colocated": "both"}   # backends/serving/host.py


def shm_need(deployment: Deployment, config: ModelConfig | None, checkpoint_nbytes: int,
             stub_nbytes: int = STUB_SHM_DEFAULT_BYTES + STUB_SHM_GROWTH_ALLOWANCE) -> dict[str, int]:
    """Bytes `deployment` puts in /dev/shm, item by item (pure: reads no file).

    - Each prefill instance's KV segment as kvtransfer creates it: `segment_geometry` of the
      engine's KV layout (pool + lease table on shm; the lease table alone on cuda_ipc). Left
      out when `config` is None (the model could not be read; its instances will say so).
    - The shared weights (WEIGHTS_ITEM; only if the deployment shares them): one file per
      distinct weight format of its CPU phases (under "auto" the prefill's differs from the
      decode's), each estimated at the checkpoint's size `checkpoint_nbytes`: an estimate (a
      4-bit GGUF's int4 and prepacked-bf16 copies are below it, an int8 copy of it above).
    - Each python backend stub's region: `stub_nbytes` per model instance.
    """
    import torch
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.weight_format import resolve_format
    from kvtransfer.control import segment_geometry

    need: dict[str, int] = {}
    phases = served_phases(deployment)
    if config is not None and PREFILL in phases:
        engine = EngineConfig(dtype=deployment.dtype, kv_dtype=deployment.kv_dtype, role="prefill",
                              limits=deployment.prefill.limits(deployment.block_size))
        _, nbytes = segment_geometry(deployment.kv_transport, LLMEngine.kv_layout(config, engine))
        for index in range(deployment.prefill.num_instances):
            need[f"KV pool of prefill-{index}"] = nbytes
    cpu = torch.device("cpu")
    formats = sorted({resolve_format(deployment.weights, _ROLES[m], cpu, deployment.dtype)
                      for m, p in phases.items() if p.device == "cpu"})
    if deployment.share_weights and formats:
        need[f"{WEIGHTS_ITEM} ({' + '.join(formats)})"] = len(formats) * checkpoint_nbytes
    stubs = sum(p.num_instances for p in phases.values()) + deployment.num_orchestrator_instances * \
        sum(m in FRONT_ENDS for m in served_models(deployment))
    need[f"python backend ({stubs} stubs)"] = stubs * stub_nbytes
    return need


def check_shm_space(need: dict[str, int], free_bytes: int, shm_dir: str = SHM_DIR) -> None:
    """ServerError (what is needed, item by item, and what is free) if `need` exceeds `free_bytes`."""
    from kvtransfer.segment import mib, shm_size_hint
    total = sum(need.values())
    if total > free_bytes:
        items = ", ".join(f"{item} {mib(n)}" for item, n in need.items())
        raise ServerError(f"not enough shared memory for this deployment: it needs {mib(total)} in "
                          f"{shm_dir} ({items}), {shm_dir} has {mib(free_bytes)} free "
                          f"({shm_size_hint(total)})")


def shm_free_bytes(shm_dir: str = SHM_DIR) -> int:
    """Free bytes in `shm_dir`; ServerError if it is missing, not a directory, or unwritable."""
    from kvtransfer import segment
    if not os.path.isdir(shm_dir):
        raise ServerError(f"{shm_dir} does not exist or is not a directory: the python backend and the "
                          "KV pools need POSIX shared memory there (Linux and Docker mount it)")
    try:
        with tempfile.TemporaryFile(dir=shm_dir):
            pass
        return segment.shm_free_bytes(shm_dir)
    except OSError as exc:
        raise ServerError(f"{shm_dir} is not writable ({exc.strerror}): the python backend and the KV "
                          "pools create their shared memory there") from None


def stub_shm_bytes(args: tuple[str, ...] = ()) -> int:
    """Allowance per python backend stub: its region's first size (shm-default-byte-size, if the
    command's arguments set it) plus room to grow."""
    sizes = [int(m.group(1)) for m in (re.search(r"shm-default-byte-size=(\d+)", a) for a in args) if m]
    return (sizes[-1] if sizes else STUB_SHM_DEFAULT_BYTES) + STUB_SHM_GROWTH_ALLOWANCE


def repository_deployment(repo: Path) -> Deployment | None:
    """The deployment a rendered repository's configs carry (deploy/render.py), or None."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        try:
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError:
            continue                        # tritonserver reports it
        if DEPLOYMENT_PARAMETER in config.parameters:
            return Deployment.from_json(config.parameters[DEPLOYMENT_PARAMETER].string_value,
                                        check_host=False)
    return None


def read_model_config(path: Path) -> ModelConfig | None:
    """The model's dimensions without its weights (a GGUF's metadata, a HF config.json), with
    the loader's own readers; None if the checkpoint cannot be read: its instances report that."""
    from backends.core import weights
    try:
        if path.is_file():
            from backends.core.gguf_file import GGUFFile
            reader = GGUFFile(path)
            arch = weights._gguf_value(reader, "general.architecture")
            return weights._gguf_config(reader, arch, {t.name: t for t in reader.tensors})
        return weights._hf_config(json.loads((path / "config.json").read_text()))
    except Exception:               # noqa: BLE001 (any unreadable checkpoint: no KV estimate)
        return None


def checkpoint_nbytes(path: Path) -> int:
    """Size of a checkpoint: the .gguf file, or a HF directory's safetensors files."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
