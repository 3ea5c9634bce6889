"""Attention backends, one per device type.

A backend turns a step's flat `AttentionMetadata` into its own per-step `plan` once, then
serves every layer: `store_kv` writes the step's new K/V into the layer's cache (quantizing
for int8 KV), `forward` attends over it. `AttentionMetadata.build` picks the backend
registered for the device the step runs on; a GPU backend (flashinfer's paged kernels) plugs
in with `register_backend("cuda", ...)`, replacing the generic torch one.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from backends.core.attention.metadata import AttentionMetadata
    from backends.core.kv_cache import LayerKV


class AttentionBackend(ABC):
    name: ClassVar[str]
    tuned_for: ClassVar[tuple[str, ...]]       # device types its heuristics were measured on

    @abstractmethod
    def plan(self, meta: AttentionMetadata, tables: list[list[int]]) -> Any:
        """Per-step state derived from `meta` (and its block tables as lists), built once."""

    @abstractmethod
    def store_kv(self, cache: LayerKV, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Write the step's new K/V ([N, kvh, hd] each) into their slots of `cache`."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [N, H, hd], k/v: [N, kvh, hd] (already stored). Returns [N, H * hd] in q's dtype."""


_BACKENDS: dict[str, AttentionBackend] = {}
_WARNED: set[str] = set()


def register_backend(device_type: str, backend: AttentionBackend) -> None:
    """Serve attention on `device_type` ('cpu', 'cuda', ...) with `backend` from now on."""
    if not isinstance(backend, AttentionBackend):
        raise ValueError(f"an attention backend must be an AttentionBackend, got {type(backend).__name__}")
    _BACKENDS[device_type] = backend


def registered() -> dict[str, str]:
    """Device type -> backend name."""
    return {kind: b.name for kind, b in sorted(_BACKENDS.items())}


def backend_for(device: torch.device | str) -> AttentionBackend:
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        raise ValueError(f"no attention backend for device type {kind!r}; registered: "
                         + ", ".join(f"{k} ({n})" for k, n in registered().items()))
    backend = _BACKENDS[kind]
    if kind not in backend.tuned_for and kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(f"attention on {kind} runs the {backend.name!r} backend, tuned for "
                      f"{', '.join(backend.tuned_for)}: correct but not fast; register a {kind} "
                      "backend (backends.core.attention.register_backend)", stacklevel=2)
    return backend
