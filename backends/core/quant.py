"""Weight-only quantized linear layers on torch's own CPU kernels.

Formats (chosen by measurement on one core of this project's CPU, docs/profile_step.md):
- int4: asymmetric, groups of `group_size` along the input. Held in the layout of
  `aten._convert_weight_to_int4pack_for_cpu` and run by `aten._weight_int4pack_mm_for_cpu`
  (the kernel torchao's CPU int4 layout calls too; torchao's wheel adds no x86 CPU kernel),
  which computes w = (code - 8) * scale + zero per group, scale/zero in bf16. A matrix-vector
  kernel: 3.5x faster than bf16 at 1 row, slower past ~12 rows.
- int8: symmetric per output channel, `aten._weight_int8pack_mm`: 1.9x faster at 1 row.
- GGUF codes map without re-quantizing: Q4_0/Q4_1 are int4 groups of 32 (w = d*q + m); Q8_0
  (w = d*q, q int8) is split into two int4 planes, w = 16d*hi + d*lo - 128d, so it too runs on
  the int4 kernel. Exact with float32 activations (float32 scales); with bf16 activations the
  kernel takes bf16 scale/zero, so GGUF's fp16 d (and Q4_1's m + 8d) round to bf16's 8-bit
  mantissa, the same precision the dense bf16 weights have.

Where the native library has `quant_linear` (csrc/quant_linear.cpp, AVX-512 VNNI or AVX2 hosts), layers
with bf16 activations whose codes fit (4-bit, or 8-bit Q8_0 as one plane; outputs a multiple of
16) run on it instead, in its own layout (`pack_int4_native`; torch's packing is then not built).
It unpacks each weight once for every row of the step (1-4 rows: int16 dot products; 5-16:
AMX tiles where the CPU has them, GGUF's fp16 scales kept exactly; 17-64: AMX on the weights
dequantized to bf16, the dense model's precision). One core, a decode instance's step on
SmolLM2 (docs/bench_quant_linear.md): batch 1 1.14x torch's int4 kernel, a 5-row verify step
1.70x, batch 8 1.54x, batch 16 1.32x; to 64 rows it is faster than the prepacked dense weight
(docs/engine.md §7), past NATIVE_INT4_MAX_ROWS the dense weight, where the layer keeps one, runs.

An int4 layer may also hold the dense weight (`dense`, or `dense_packed`): then steps of more
than INT4_MAX_ROWS rows (INT4_MAX_ROWS_PACKED when prepacked), where the dense bf16 GEMM
(oneDNN, AMX) is faster, use it. Every tensor is a
registered buffer, so instances can share them (backends/core/weight_share.py).

Dense weights can be prepacked into oneDNN's blocked layout (`prepack_dense`): the same results,
bit for bit, 1.4x faster at 1 row and 1.7x at 512 rows than aten::mm on the plain layout (bf16,
one core, the model's layers). A prepacked weight is an opaque oneDNN tensor with no storage, so
it is private to its process: it is kept as a plain attribute, never a shareable buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INT4_MAX_ROWS = 12     # int4 kernel vs plain dense bf16 cross over at 12-16 rows (SmolLM2, 1 core)
INT4_MAX_ROWS_PACKED = 4   # ... vs oneDNN-prepacked dense bf16: at 4-6 rows
NATIVE_INT4_MAX_ROWS = 64  # our kernel vs prepacked dense bf16 in a decode step: ours to 64 rows
# (one core, SmolLM2, whole steps: batch 20 46 vs 64 ms, 32 61 vs 77, 64 108 vs 122)
INT4_GROUP_SIZES = (32, 64, 128, 256)
_PACK_ROWS = 64        # the CPU int4 pack interleaves output channels in blocks of 64


@dataclass
class GroupQuant:
    """Codes with a scale and offset per group of the input: w = scale * q + offset."""
    q: torch.Tensor          # [N, K] uint8 codes in [0, 2**bits)
    scale: torch.Tensor      # [N, K // group] float32
    offset: torch.Tensor     # [N, K // group] float32
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        n, k = self.q.shape
        if self.scale.shape != self.offset.shape or self.scale.shape[0] != n or k % self.scale.shape[1]:
            raise ValueError(f"scale/offset {tuple(self.scale.shape)} do not fit codes {tuple(self.q.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        w = self.q.view(n, k // g, g).float() * self.scale[..., None] + self.offset[..., None]
        return w.view(n, k).to(dtype)

    def map_rows(self, fn) -> GroupQuant:
        """Apply a row (output channel) permutation `fn` to codes, scales and offsets alike."""
        return GroupQuant(fn(self.q).contiguous(), fn(self.scale).contiguous(),
                          fn(self.offset).contiguous(), self.bits)

    @staticmethod
    def cat(parts: list[GroupQuant]) -> GroupQuant:
        if len({(p.bits, p.group_size, p.q.shape[1]) for p in parts}) != 1:
            raise ValueError("cannot concatenate quantized weights of different bits/groups/widths")
        return GroupQuant(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.offset for p in parts]), parts[0].bits)


def quantize_int4(w: torch.Tensor, group_size: int) -> GroupQuant:
    """Asymmetric min/max int4 in groups of `group_size` along the input (HF weights on load)."""
    n, k = w.shape
    check_group_size(k, group_size)
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return GroupQuant(q.view(n, k), scale, lo, 4)


NATIVE_BLOCK = 32      # inputs per (scale, offset) in the native layout (csrc/quant_linear.cpp)
NATIVE_TILE = 16       # outputs per tile there


def native_int4_enabled(dtype: torch.dtype) -> bool:
    """Whether int4 layers with `dtype` activations run on our kernel (csrc/quant_linear.cpp): bf16
    activations, the native library loaded with the op (AVX-512 VNNI or AVX2 hosts). float32 engines keep
    torch's kernel, which is exact on float32 activations."""
    if dtype != torch.bfloat16:
        return False
    from backends.core import native
    return native.has("quant_linear")


def native_int4_fits(gq: GroupQuant) -> bool:
    """Whether the native kernel can hold these weights (4- or 8-bit codes): outputs a multiple
    of 16, groups a multiple of 32."""
    return gq.shape[0] % NATIVE_TILE == 0 and gq.group_size % NATIVE_BLOCK == 0


def pack_int4_native(gq: GroupQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N/16, K/32, 256 (4-bit) or 512 (8-bit)], scales_offsets float16
    [N/16, K/32, 2, 16]) in csrc/quant_linear.cpp's layout. Groups wider than 32 repeat their
    (scale, offset) per block of 32; fp16 holds GGUF's own fp16 values exactly."""
    if not native_int4_fits(gq):
        raise ValueError(f"the native kernel needs outputs a multiple of 16 and groups "
                         f"a multiple of 32; got {gq.bits} bits, shape {gq.shape}, groups of {gq.group_size}")
    n, k = gq.shape
    t, b = n // NATIVE_TILE, k // NATIVE_BLOCK
    if gq.bits == 4:
        # q[tile, lane, block, half, u, j]: output 16 tile + lane, input 32 block + 16 half + 2 u + j
        q = gq.q.view(t, NATIVE_TILE, b, 2, 8, 2)
        byte = q[:, :, :, 0] | (q[:, :, :, 1] << 4)                     # [t, lane, b, u, j]
    else:                                                               # one code a byte
        byte = gq.q.view(t, NATIVE_TILE, b, 16, 2)                      # [t, lane, b, pair, j]
    codes = byte.permute(0, 2, 3, 1, 4).reshape(t, b, -1).to(torch.uint8).contiguous()
    reps = gq.group_size // NATIVE_BLOCK
    scale, offset = (v.repeat_interleave(reps, 1).view(t, NATIVE_TILE, b) for v in (gq.scale, gq.offset))
    so = torch.stack([scale, offset], 2).permute(0, 3, 2, 1)            # [t, b, 2, lane]
    return codes, so.to(torch.float16).contiguous()


def unpack_int4_native(codes: torch.Tensor, so: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weights [N, K] that `pack_int4_native`'s tensors hold, or their rows `ids`."""
    t, b, nbytes = codes.shape
    ids = torch.arange(t * NATIVE_TILE) if ids is None else ids
    tile, lane = ids // NATIVE_TILE, ids % NATIVE_TILE
    byte = codes.view(t, b, nbytes // 32, NATIVE_TILE, 2)[tile, :, :, lane]   # [L, b, chunk, j]
    if nbytes == 256:                                                   # 4-bit: two codes a byte
        byte = torch.stack([byte & 15, byte >> 4], 2)
    q = byte.reshape(len(ids), b, NATIVE_BLOCK).float()
    s = so[tile, :, :, lane].float()                                     # [L, b, 2]
    return (q * s[..., :1] + s[..., 1:]).view(len(ids), b * NATIVE_BLOCK)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide a layer's {in_features} "
                         f"inputs; choose one of {[g for g in INT4_GROUP_SIZES if in_features % g == 0]}")


def _int4_planes(gq: GroupQuant) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(codes, scale, zero) planes in the kernel's form (code - 8) * scale + zero, summed."""
    if gq.bits == 4:
        return [(gq.q, gq.scale, gq.offset + 8 * gq.scale)]
    # 8-bit codes u = 16 hi + lo: (hi-8)*16s + Z_hi + (lo-8)*s + Z_lo = s*u + offset needs
    # Z_hi + Z_lo = offset + 136 s; Q8_0's offset is -128 d, so Z_hi = 0 and Z_lo = 8 s, both
    # exact in bf16 (a zero of -120 d would round once per group and shift all 32 weights)
    hi, lo = gq.q >> 4, gq.q & 15
    return [(hi, 16 * gq.scale, gq.offset + 128 * gq.scale), (lo, gq.scale, 8 * gq.scale)]


def _pack_plane(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n = codes.shape[0]
    pad = -n % _PACK_ROWS
    if pad:                                   # zero rows, sliced off the output
        codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, zero))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).to(dtype).contiguous()  # [K/G, N, 2]
    return packed, scales_zeros


PREPACK_BATCH_HINT = 128      # oneDNN picks its blocking for this many rows; any count runs


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and bf16_gemm_native()


def bf16_gemm_native() -> bool:
    """Whether torch's CPU bf16 GEMM is oneDNN's native one on this host (AVX-512 BF16, AMX, or
    AVX-NE-CONVERT). Elsewhere (an AVX2 host) it is a slow fallback: one core of an AMD EPYC
    without AVX-512, a 157 x 576 x 1536 GEMM, 36.4 ms in bf16 against 3.8 ms in float32 with the
    conversions of x and y included (1 row 0.24 against 0.09 ms)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def widen_dense(dtype: torch.dtype, device: torch.device) -> bool:
    """Dense bf16 weights run as float32 GEMMs on this host (`WideLinear`): a bf16 CPU engine
    where the bf16 GEMM is not native. The float32 weights are the bf16 ones exactly and the
    GEMM accumulates in float32 either way, so results differ only in summation order."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not bf16_gemm_native()


def prepack_dense(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] dense weight -> oneDNN's prepacked form (for `packed_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PREPACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """nn.Linear with its weight prepacked for oneDNN (private to this process)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.packed = prepack_dense(linear.weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class WideLinear(nn.Module):
    """nn.Linear on bf16 activations with its weight held in float32 (see `widen_dense`): x is
    widened, the float32 GEMM runs, y is rounded back to x's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.register_buffer("weight", linear.weight.detach().float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ W^T (+ bias) with W in one or two int4 planes (see module docstring)."""

    def __init__(self, gq: GroupQuant, dtype: torch.dtype, bias: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None) -> None:
        super().__init__()
        check_group_size(gq.shape[1], gq.group_size)
        self.out_features, self.in_features = gq.shape
        self.group_size = gq.group_size
        self.native = native_int4_enabled(dtype) and native_int4_fits(gq)
        self.native_dtype = dtype
        if self.native:                   # csrc/quant_linear.cpp's layout, nothing of torch's
            self.num_planes = 0
            codes, so = pack_int4_native(gq)
            self.register_buffer("native_codes", codes)
            self.register_buffer("native_so", so)
        else:
            self.num_planes = 1 if gq.bits == 4 else 2
        for i, plane in enumerate(_int4_planes(gq)[:self.num_planes]):
            packed, scales_zeros = _pack_plane(*plane, dtype)
            self.register_buffer(f"packed{i}", packed)
            self.register_buffer(f"scales_zeros{i}", scales_zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)
        self.dense_packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Move the dense fallback into oneDNN's layout (private; see the module docstring)."""
        if self.dense is not None:
            self.dense_packed, self.dense = prepack_dense(self.dense), None

    def widen(self) -> None:
        """Hold the dense fallback in float32 (`widen_dense`: bf16 GEMMs are slow on this host)."""
        if self.dense is not None:
            self.dense = self.dense.float()

    def _planes(self):
        return [(getattr(self, f"packed{i}"), getattr(self, f"scales_zeros{i}"))
                for i in range(self.num_planes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] -> [M, N]; past the kernel's row limit, the dense weight where there is one
        most_packed, most = ((NATIVE_INT4_MAX_ROWS, NATIVE_INT4_MAX_ROWS) if self.native
                             else (INT4_MAX_ROWS_PACKED, INT4_MAX_ROWS))
        if x.shape[0] > most_packed and self.dense_packed is not None:
            return packed_linear(x, self.dense_packed, self.bias)
        if x.shape[0] > most and self.dense is not None:
            if self.dense.dtype != x.dtype:                 # widened (see `widen`)
                y = F.linear(x.to(self.dense.dtype), self.dense).to(x.dtype)
                return y if self.bias is None else y.add_(self.bias)
            return F.linear(x, self.dense, self.bias)
        if self.native:
            y = torch.ops.distserve.quant_linear(x.contiguous(), self.native_codes, self.native_so)
            return y if self.bias is None else y.add_(self.bias)
        y = None
        for packed, sz in self._planes():
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, sz)
            y = part if y is None else y.add_(part)
        y = y[:, :self.out_features] if y.shape[1] != self.out_features else y
        return y if self.bias is None else y.add_(self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows (output channels) `ids`: [len(ids), K] (an embedding lookup). Reads
        torch's packed layout, which depends on the CPU (check `rows_supported()` first)."""
        if self.dense is not None:
            return self.dense[ids].to(self.native_dtype)
        if self.native:
            return unpack_int4_native(self.native_codes, self.native_so, ids).to(self.native_dtype)
        out = None
        for packed, sz in self._planes():
            blocks = packed.view(-1, self.in_features, _PACK_ROWS // 2)         # [NB, K, 32]
            col = ids % _PACK_ROWS
            byte = blocks[ids // _PACK_ROWS, :, col % 32]                       # [L, K]
            codes = (byte >> (4 * (col >= 32).to(torch.uint8))[:, None]) & 15
            s = sz[:, ids].transpose(0, 1).float()                               # [L, K/G, 2]
            g = codes.view(len(ids), -1, self.group_size).float()
            w = (g - 8) * s[..., :1] + s[..., 1:]
            out = w if out is None else out.add_(w)
        return out.view(len(ids), self.in_features).to(sz.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8, symmetric per output channel."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("weight", (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        return y if self.bias is None else y.add_(self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scales[ids, None].float()).to(self.scales.dtype)


class RowsEmbedding(nn.Module):
    """An embedding that reads its rows from a quantized layer (the tied LM head, say)."""

    def __init__(self, source: Int4Linear | Int8Linear) -> None:
        super().__init__()
        self._source = [source]           # not a submodule: its buffers belong to the head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._source[0].rows(ids)


_ROWS_SUPPORTED: bool | None = None


def rows_supported() -> bool:
    """Whether `Int4Linear.rows()` can read torch's packed int4 layout on this CPU (blocks of 64
    rows on AVX512; AVX2 and scalar builds lay it out otherwise), probed once."""
    global _ROWS_SUPPORTED
    if _ROWS_SUPPORTED is None:
        _ROWS_SUPPORTED = _probe_rows()
    return _ROWS_SUPPORTED


def _probe_rows() -> bool:
    codes = torch.randint(0, 16, (2 * _PACK_ROWS, 64), generator=torch.Generator().manual_seed(0))
    gq = GroupQuant(codes.to(torch.uint8), torch.ones(128, 2), torch.full((128, 2), -8.0), 4)
    probe = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(probe)
    probe.out_features, probe.in_features, probe.group_size, probe.num_planes = 128, 64, 32, 1
    probe.native = False
    packed, sz = _pack_plane(*_int4_planes(gq)[0], torch.bfloat16)
    probe.register_buffer("packed0", packed)
    probe.register_buffer("scales_zeros0", sz)
    probe.register_buffer("dense", None)
    try:
        return torch.equal(probe.rows(torch.arange(128)).float(), codes.float() - 8)
    except RuntimeError:                  # a packed shape that is not [N, K/2] blocks of 64
        return False
