"""Paged KV cache: a block pool another process can map, and a block manager.

Lifecycle of a block: free -> allocated to a sequence (its block table lists it) -> freed when
the sequence finishes, is aborted, or (on a prefill instance) when its KV has been handed off.
With prefix caching (prefix_cache.py) a full block is also registered under its tokens, may be
held by several sequences at once (reference counts), and when the last lets go it stays free
but cached, found again by a later prompt, until the pool needs it (LRU).
The pool is block-major: one block's KV for every layer is a single contiguous byte range, so
a transfer of a request's KV is one copy per block, whatever the layer count or dtype.

Byte layout of one block (`KVLayout.block_nbytes` bytes, little-endian):

    float32 / bfloat16 / float16: [num_layers, 2 (K,V), num_kv_heads, block_size, head_dim]
        elements of that dtype.
    int8: [num_layers, 2 (K,V)] planes of `plane_nbytes` bytes; a plane is
        values  int8      [num_kv_heads, block_size, head_dim]   at byte 0
        scales  bfloat16  [num_kv_heads, block_size]             at byte `scales_offset`
        (values_nbytes rounded up to 2). One scale per (token, KV head): symmetric,
        x ~= value * scale with scale = absmax / 127 rounded UP to a bfloat16 number, so the
        stored scale is exact (it adds no error beyond the int8 rounding, |error| <= scale / 2)
        and |value| <= 127. bfloat16 rather than float32: half the scale bytes (SmolLM2: 1.94x
        the tokens of bf16 KV instead of 1.88x) with float32's exponent range, which float16
        lacks (a small V head's absmax / 127 underflows it).

Inside a plane (and in the float layouts) each KV head's tokens are contiguous, so attention
gathers one head's context as a dense [tokens, head_dim] matrix with no transposing copy.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from backends.core.config import ModelConfig
from backends.core.prefix_cache import PrefixCache

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                   "float16": torch.float16}
KV_DTYPES: tuple[str, ...] = (*_DTYPES, "int8")      # what a KV pool may hold
SCALE_DTYPE = torch.bfloat16                          # int8 KV: one scale per (token, KV head)
INT8_MAX = 127


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported for the KV cache; use one of {list(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    """A floating-point dtype by name (activations, weights, float KV)."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {list(_DTYPES)}")
    return _DTYPES[name]


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"           # KV_DTYPES

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KV dtype {self.dtype!r} is not supported; use one of {list(KV_DTYPES)}")

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int = 16,
                  dtype: str = "bfloat16") -> KVLayout:
        return cls(num_blocks, config.num_layers, block_size, config.num_kv_heads,
                   config.head_dim, dtype)

    @property
    def is_quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def element_dtype(self) -> torch.dtype:
        """The dtype K/V values are held in (torch.int8 for int8 KV)."""
        return torch.int8 if self.is_quantized else _DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The pool tensor's dtype: the float dtype itself, or raw bytes (uint8) for int8 KV."""
        return torch.uint8 if self.is_quantized else _DTYPES[self.dtype]

    @property
    def shape(self) -> tuple[int, ...]:
        """The pool tensor's shape (block-major; for int8 KV the last axis is a plane's bytes)."""
        if self.is_quantized:
            return (self.num_blocks, self.num_layers, 2, self.plane_nbytes)
        return (self.num_blocks, self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def values_nbytes(self) -> int:
        """Bytes of one layer's K (or V) values in one block."""
        return self.num_kv_heads * self.block_size * self.head_dim * self.element_dtype.itemsize

    @property
    def scales_offset(self) -> int:
        """int8 KV: where a plane's scales start (after its values, aligned for bfloat16)."""
        return _align(self.values_nbytes, SCALE_DTYPE.itemsize)

    @property
    def plane_nbytes(self) -> int:
        """Bytes of one layer's K (or V) in one block, scales included."""
        if not self.is_quantized:
            return self.values_nbytes
        return self.scales_offset + self.num_kv_heads * self.block_size * SCALE_DTYPE.itemsize

    @property
    def block_nbytes(self) -> int:
        return self.num_layers * 2 * self.plane_nbytes

    @property
    def token_nbytes(self) -> float:
        """KV bytes per token over all layers (a block's bytes over its tokens)."""
        return self.block_nbytes / self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def kv_bytes_per_token(config: ModelConfig, dtype: str, block_size: int = 16) -> float:
    """KV bytes one token takes in a pool of `dtype` (int8: its scales included)."""
    return KVLayout.for_model(config, 1, block_size, dtype).token_nbytes


@dataclass(frozen=True)
class LayerKV:
    """One layer's K and V in every block, as attention writes and reads them (views, no copies).

    k, v: [num_blocks, num_kv_heads, block_size, head_dim] in the element dtype (int8 if quantized);
    k_scale, v_scale: [num_blocks, num_kv_heads, block_size] bfloat16 (int8 KV only).
    """
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        return self.k_scale is not None


def layer_views(data: torch.Tensor, layout: KVLayout) -> list[LayerKV]:
    """Per-layer views over a pool tensor of `layout.shape` and `layout.storage_dtype`."""
    if not layout.is_quantized:
        return [LayerKV(data[:, i, 0], data[:, i, 1]) for i in range(layout.num_layers)]
    nb, kvh, bs, hd = layout.num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim
    off = layout.scales_offset

    def values(plane: torch.Tensor) -> torch.Tensor:
        return plane[:, :layout.values_nbytes].view(torch.int8).view(nb, kvh, bs, hd)

    def scales(plane: torch.Tensor) -> torch.Tensor:
        return plane[:, off:off + kvh * bs * SCALE_DTYPE.itemsize].view(SCALE_DTYPE).view(nb, kvh, bs)

    planes = [(data[:, i, 0], data[:, i, 1]) for i in range(layout.num_layers)]
    return [LayerKV(values(k), values(v), scales(k), scales(v)) for k, v in planes]


def _ceil_to_bf16(x: torch.Tensor) -> torch.Tensor:
    # x: float32 >= 0 -> the smallest bfloat16 >= x (round the low 16 mantissa bits up)
    bits = (x.view(torch.int32) + 0xFFFF) & -0x10000
    return bits.view(torch.float32).to(SCALE_DTYPE)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] -> (int8 values [..., head_dim], bfloat16 scales [...]), one symmetric
    absmax scale per vector (see the module docstring). No clamp is needed: scale >= absmax / 127,
    so |x / scale| <= 127 (float rounding keeps it below 127.5)."""
    xf = x.float()
    scale = _ceil_to_bf16(xf.abs().amax(-1).div_(INT8_MAX))
    inv = scale.float().clamp_min_(torch.finfo(torch.float32).tiny).reciprocal_()   # 0 stays 0
    values = xf.mul_(inv[..., None]) if xf is not x else xf * inv[..., None]
    return values.round_().to(torch.int8), scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [..., head_dim] int8, scales [...] -> [..., head_dim] in `dtype` (the product in
    float32: int8 -> float32 also converts faster than int8 -> bfloat16 on CPU)."""
    return (values.float() * scales.float()[..., None]).to(dtype)


class KVPool:
    """The KV storage. `buffer` (anything exposing the buffer protocol, e.g. a shared-memory
    segment's `.buf`) makes the pool live in memory another process can map. `layers[i]` is
    layer i's LayerKV."""

    def __init__(self, layout: KVLayout, buffer: object | None = None,
                 device: torch.device | str = "cpu") -> None:
        if buffer is None:
            data = torch.zeros(layout.shape, dtype=layout.storage_dtype, device=device)
        else:
            view = memoryview(buffer).cast("B")
            if view.nbytes < layout.nbytes:
                raise ValueError(f"KV buffer has {view.nbytes} bytes, layout needs {layout.nbytes}")
            count = math.prod(layout.shape)
            data = torch.frombuffer(view, dtype=layout.storage_dtype, count=count).view(layout.shape)
        self._attach(layout, data)

    def _attach(self, layout: KVLayout, data: torch.Tensor) -> None:
        self.layout = layout
        self.data = data
        self.layers = layer_views(data, layout)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks: [len(block_ids), *layout.shape[1:]]."""
        return self.data[torch.as_tensor(block_ids, dtype=torch.long)]

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        self.data[torch.as_tensor(block_ids, dtype=torch.long)] = blocks

    def release(self) -> None:
        """Drop every tensor view so the underlying buffer can be closed."""
        self.layers = []
        self.data = torch.empty(0)


class BlockManager:
    """Hands out KV block ids, counting references, and keeps count so leaks show
    (`num_used == 0`, `num_free == num_blocks`). With a `cache` (prefix_cache.PrefixCache) a
    block several sequences share is held by each (`share`), and a cached block whose last
    holder lets go stays findable, free but cached, until the pool has no never-used block
    left and evicts it (least recently used first). Cached blocks no one holds count as free."""

    def __init__(self, num_blocks: int, cache: PrefixCache | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.cache = cache
        self._free: deque[int] = deque(range(num_blocks))      # free and holding nothing cached
        self._refs = [0] * num_blocks
        self._num_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + (self.cache.num_free if self.cache else 0)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self._num_used

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold cached KV (evictable)."""
        return self.cache.num_free if self.cache else 0

    def can_allocate(self, n: int, shared: list[int] | tuple[int, ...] = ()) -> bool:
        """Whether `n` new blocks are free once the cached `shared` blocks are taken too."""
        return n <= self.num_free - sum(1 for b in shared if not self._refs[b])

    def allocate(self, n: int) -> list[int]:
        if n == 0:
            return []           # most decode rows need no new block
        if n > self.num_free:
            raise MemoryError(f"KV cache full: need {n} blocks, {self.num_free} free")
        ids = [self._free.popleft() if self._free else self.cache.evict() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        self._num_used += n
        return ids

    def share(self, block_ids: list[int]) -> list[int]:
        """One more reference to each of these cached blocks (a prefix hit); returns them."""
        for b in block_ids:
            if not self._refs[b]:
                self.cache.unpark(b)
                self._num_used += 1
            self._refs[b] += 1
        return list(block_ids)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each. A sequence's blocks go last block first, so its tail is
        evicted before the prefix other prompts are likelier to share."""
        for b in reversed(block_ids) if self.cache else block_ids:
            if not (0 <= b < self.num_blocks and self._refs[b]):
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            self._num_used -= 1
            if self.cache is not None and self.cache.holds(b):
                self.cache.park(b)
            else:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]
