"""Turn a loaded model's linear layers into the deployment's weight format.

`weights` (EngineConfig.weights, the deployment's `weights`):
- bf16: dense weights in the activation dtype (what the checkpoint dequantizes to).
- int8: weight-only int8 per output channel, for every linear layer (re-quantized).
- int4: every linear layer on the int4 kernel, nothing dense: GGUF Q4_0/Q4_1 codes as they
  are, GGUF Q8_0 as two exact int4 planes (the file's own choice of 8 bits for, say, the head
  is kept), anything else quantized on load to groups of `group_size`. The smallest footprint.
- auto: the checkpoint's own format where it maps, per phase. A prefill engine (compute-bound:
  the dense AMX GEMM is 8x faster than the int4 kernel at 512 rows) keeps dense weights; a
  decode or colocated engine runs GGUF Q4_x / Q8_0 layers on the int4 kernel and keeps the
  dense weight beside them for steps of more than INT4_MAX_ROWS_PACKED (4) rows, 12 when not
  prepacked; on our native kernel (quant.py: AVX-512 VNNI or AVX2 hosts, bf16) for up to
  NATIVE_INT4_MAX_ROWS (64) rows, the Q8_0 head as one 8-bit plane. HF checkpoints, float32
  engines and GPU engines stay dense (the int4/int8 kernels are CPU ones, fast on bf16
  activations only).

The int4 kernel holds GGUF codes exactly with float32 activations; with bf16 its scales round
to bf16, the precision the dense bf16 weights have, so `auto` loses nothing a dense bf16 engine
keeps. Dense weights are prepacked for oneDNN unless `prepack` is off (private to the process); on a
host whose bf16 GEMM is not native (AVX2: 10x slower than float32) a bf16 engine holds them in
float32 instead and widens the activations around each GEMM (quant.widen_dense).
"""
from __future__ import annotations

import torch
from torch import nn

from backends.core.quant import (GroupQuant, Int4Linear, Int8Linear, PackedLinear, RowsEmbedding,
                                 WideLinear, can_prepack, quantize_int4, rows_supported, widen_dense)

WEIGHT_FORMATS = ("bf16", "int8", "int4", "auto")


def resolve_format(weights: str, role: str, device: torch.device, dtype: str = "bfloat16") -> str:
    """The format an engine of `role` actually runs ('auto' decided per phase)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "auto":
        # dense where it is faster: compute-bound prefill, float32 (the int4 kernel is only fast
        # on bf16 activations: 200 ms vs 6 ms a pass), and devices without these CPU kernels
        fast_int4 = role != "prefill" and dtype == "bfloat16" and device.type == "cpu"
        return "auto" if fast_int4 else "bf16"
    if weights != "bf16" and device.type != "cpu":
        raise ValueError(f"weights {weights!r}: the quantized kernels here are torch's CPU ones; "
                         f"on {device.type} use weights 'bf16'")
    return weights


def apply_weight_format(model: nn.Module, state_dict: dict, fmt: str, group_size: int = 32,
                        prepack: bool = False) -> None:
    """Replace `model`'s linear layers in place (after the dense weights are loaded); with
    `prepack`, dense weights go into oneDNN's layout where it runs (bf16 on CPU)."""
    if fmt != "bf16":
        _quantize(model, state_dict, fmt, group_size)
    param = next(model.parameters())
    if prepack and can_prepack(param.dtype, param.device):
        _prepack(model)
    elif widen_dense(param.dtype, param.device):
        _widen(model)


def _prepack(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            _set_module(model, name, PackedLinear(module))
        elif isinstance(module, Int4Linear):
            module.prepack()


def _widen(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            _set_module(model, name, WideLinear(module))
        elif isinstance(module, Int4Linear):
            module.widen()


def _quantize(model: nn.Module, state_dict: dict, fmt: str, group_size: int) -> None:
    dtype = next(model.parameters()).dtype
    sources = model.linear_sources() if hasattr(model, "linear_sources") else {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        quant = _from_checkpoint(sources.get(name), state_dict)
        new = _quantized(module, quant, fmt, group_size, dtype)
        if new is not None:
            _set_module(model, name, new)
    head = getattr(model, "lm_head", None)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and (isinstance(head, Int8Linear) or (isinstance(head, Int4Linear) and (head.native or rows_supported()))):
        model.embed_tokens = RowsEmbedding(head)       # lookups read the quantized head's rows


def _from_checkpoint(names: list[str] | None, state_dict: dict) -> GroupQuant | None:
    """The layer's GGUF codes (q/k/v or gate/up concatenated), if all its parts have them."""
    if not names or not all(isinstance(state_dict.get(n), GroupQuant) for n in names):
        return None
    parts = [state_dict[n] for n in names]
    try:
        return GroupQuant.cat(parts)
    except ValueError:                    # mixed types inside one packed layer
        return None


def _quantized(module: nn.Linear, quant: GroupQuant | None, fmt: str, group_size: int,
               dtype: torch.dtype) -> nn.Module | None:
    w, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if fmt == "int8":
        return Int8Linear(w, dtype, bias)
    if fmt == "int4":                     # GGUF codes as they are (Q8_0: two exact planes)
        keep = quant is not None      # exact codes; group_size is for weights quantized on load
        return Int4Linear(quant if keep else quantize_int4(w, group_size), dtype, bias)
    if quant is None:                     # auto: a layer the checkpoint holds dense stays dense
        return None
    return Int4Linear(quant, dtype, bias, dense=w)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
