"""Paged KV cache: a block pool another process can map, and a block manager.

Lifecycle of a block: free -> allocated to a sequence (its block table lists it) -> freed when
the sequence finishes, is aborted, or (on a prefill instance) when its KV has been handed off.
The pool is one tensor laid out block-major, [num_blocks, num_layers, 2 (K,V), num_kv_heads,
block_size, head_dim], so one block's KV for every layer is a single contiguous range: a
transfer of a request's KV is one copy per block, whatever the layer count. Inside a block
each KV head's tokens are contiguous, so attention gathers one head's context as a dense
[tokens, head_dim] matrix with no transposing copy.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from backends.core.config import ModelConfig

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                   "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported for the KV cache; use one of {list(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {list(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be > 0, got {getattr(self, name)}")
        dtype_from_name(self.dtype)

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int = 16,
                  dtype: str = "bfloat16") -> KVLayout:
        return cls(num_blocks, config.num_layers, block_size, config.num_kv_heads,
                   config.head_dim, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def block_nbytes(self) -> int:
        itemsize = self.torch_dtype.itemsize
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class KVPool:
    """The KV storage. `buffer` (anything exposing the buffer protocol, e.g. a shared-memory
    segment's `.buf`) makes the pool live in memory another process can map."""

    def __init__(self, layout: KVLayout, buffer: object | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.layout = layout
        if buffer is None:
            self.data = torch.zeros(layout.shape, dtype=layout.torch_dtype, device=device)
        else:
            view = memoryview(buffer).cast("B")
            if view.nbytes < layout.nbytes:
                raise ValueError(f"KV buffer has {view.nbytes} bytes, layout needs {layout.nbytes}")
            count = math.prod(layout.shape)
            self.data = torch.frombuffer(view, dtype=layout.torch_dtype, count=count).view(layout.shape)
        # Per-layer views [num_blocks, num_kv_heads, block_size, head_dim] (no copies).
        self.k = [self.data[:, i, 0] for i in range(layout.num_layers)]
        self.v = [self.data[:, i, 1] for i in range(layout.num_layers)]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks: [len(block_ids), num_layers, 2, kvh, block_size, head_dim]."""
        return self.data[torch.as_tensor(block_ids, dtype=torch.long)]

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        self.data[torch.as_tensor(block_ids, dtype=torch.long)] = blocks

    def release(self) -> None:
        """Drop every tensor view so the underlying buffer can be closed."""
        self.k, self.v = [], []
        self.data = torch.empty(0)


class BlockManager:
    """Hands out KV block ids and keeps count so leaks show (`num_free == num_blocks`)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache full: need {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            self._free.append(b)
