"""Model architecture description shared by the weight loaders and the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Arch = Literal["llama", "qwen2", "opt"]
SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2", "opt")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3"), or linear position scaling ("linear")."""
    rope_type: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"rope_scaling.rope_type {self.rope_type!r} is not supported (llama3, linear)")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False            # Qwen2 has biases on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # OPT only: learned positions (with an offset of 2), LayerNorm, ReLU MLP, biases everywhere.
    do_layer_norm_before: bool = True

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch {self.arch!r} is not supported; choose one of {SUPPORTED_ARCHS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, per element byte (multiply by itemsize)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
