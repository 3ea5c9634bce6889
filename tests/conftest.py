from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    return Path(os.environ.get("DISTSERVE_MODEL", DEFAULT_MODEL))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.skip(f"default model not found at {path} (run ./build.sh setup or set DISTSERVE_MODEL)")
    return path


@pytest.fixture(scope="session")
def smollm_fp32(gguf_path):
    """(ModelConfig, HF-named float32 state dict) of the default model, loaded once."""
    from backends.core.weights import load_checkpoint
    return load_checkpoint(gguf_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(gguf_path):
    """The reference: transformers' float32 model of the default checkpoint, loaded once (its GGUF
    dequantization takes ~18 s on a 2-core host; test_reference and test_weights share it)."""
    from transformers import AutoModelForCausalLM
    if gguf_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(gguf_path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm_tokenizer(gguf_path):
    from backends.core.tokenizer import Tokenizer
    return Tokenizer.load(gguf_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(ModelConfig, float32 state dict) of a tiny random-weight Llama (tests/helpers.py)."""
    from backends.core.weights import load_checkpoint
    from tests.helpers import save_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_hf_model("llama", path)
    return load_checkpoint(path, torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a shared 2-core machine: one torch thread avoids OpenMP spin contention
    (measured beside two busy processes: 2 threads made its tests 14-65x slower). A module
    takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
