"""Checkpoint loading: a GGUF file or a Hugging Face safetensors directory -> (ModelConfig, state dict).

The state dict always uses Hugging Face transformers parameter names (`model.layers.0.self_attn.q_proj.weight`,
`model.decoder.layers.0.fc1.bias`, ...) in HF's [out, in] layout, whatever the source format. With tied
embeddings `lm_head.weight` may be absent; `config.tie_word_embeddings` tells the model to reuse the embedding.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from backends.core.config import ModelConfig, RopeScaling
from backends.core.quant import GroupQuant

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "opt": "opt"}
GGUF_ARCHS = ("llama", "qwen2")

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    keep_quantized: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a checkpoint for serving.

    Args:
        path: a `.gguf` file, or a directory with `config.json` plus `model.safetensors` or
            `model.safetensors.index.json` (sharded).
        dtype: torch.float32 or torch.bfloat16; every returned tensor is contiguous in this dtype.
        keep_quantized: GGUF Q4_0 / Q4_1 / Q8_0 tensors come back as their codes
            (`quant.GroupQuant`, exact: `.dequantize()` equals gguf's dequantization) instead of
            dense tensors, so the engine can run them without re-quantizing.
    Returns:
        (config, state_dict) with Hugging Face parameter names.
    Raises:
        FileNotFoundError: the path or the expected files are missing.
        ValueError: unsupported dtype or architecture, or tensors missing from the checkpoint.
        NotImplementedError: a supported architecture with a variant the model cannot run.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {SUPPORTED_DTYPES}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .gguf file or a HF model directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        config, state = _load_gguf(path, dtype, keep_quantized)
    else:
        config, state = _load_hf_dir(path, dtype)
    _check_names(config, state, path)
    return config, state


def expected_param_names(config: ModelConfig) -> list[str]:
    """HF parameter names the model needs (lm_head.weight only when embeddings are untied)."""
    if config.arch == "opt":
        return _opt_param_names(config)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v", "o")]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if config.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in ("q", "k", "v")]
    return names


def _opt_param_names(config: ModelConfig) -> list[str]:
    names = ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"]
    if config.do_layer_norm_before:
        names += ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"]
    for i in range(config.num_layers):
        names += [f"model.decoder.layers.{i}.{m}.{w}" for m in modules for w in ("weight", "bias")]
    return names


def _check_names(config: ModelConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    missing = [n for n in expected_param_names(config) if n not in state]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path} lacks tensors {missing[:5]}{more}")


# ---------------------------------------------------------------- GGUF

def _load_gguf(path: Path, dtype: torch.dtype, keep_quantized: bool = False
               ) -> tuple[ModelConfig, dict[str, torch.Tensor | GroupQuant]]:
    from gguf.quants import dequantize

    from backends.core.gguf_file import GGUFFile

    reader = GGUFFile(path)
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; choose one of {GGUF_ARCHS}")
    tensors = {t.name: t for t in reader.tensors}
    config = _gguf_config(reader, arch, tensors)
    state: dict[str, torch.Tensor | GroupQuant] = {}
    for t in tqdm(reader.tensors, desc=f"Loading {path.name}", unit="tensor", disable=None):
        if t.name == "rope_freqs.weight":   # llama3 rope scaling, already folded into the config
            continue
        shape = tuple(reversed(t.shape.tolist()))
        if keep_quantized and t.tensor_type.name in _GGUF_BLOCKS:
            w = _gguf_group_quant(np.asarray(t.data), t.tensor_type.name, shape)
        else:
            arr = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            if not arr.flags.writeable:         # F32 tensors are read-only views of the memory map
                arr = arr.copy()
            w = torch.from_numpy(arr).to(dtype)
        heads = {".attn_q.": config.num_heads, ".attn_k.": config.num_kv_heads}
        for part, n in heads.items():
            if arch == "llama" and part in t.name:
                w = w.map_rows(lambda x, n=n: _unpermute_rope(x, n)) if isinstance(w, GroupQuant) \
                    else _unpermute_rope(w, n)
        state[_hf_name_from_gguf(t.name)] = w if isinstance(w, GroupQuant) else w.contiguous()
    return config, state


# GGUF block types that map onto int4 groups of 32: bytes per block, and the code bits
_GGUF_BLOCKS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


def _gguf_group_quant(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> GroupQuant:
    """Decode GGUF blocks of 32 weights into codes, scales and offsets (w = d*q (+ m))."""
    nbytes, bits = _GGUF_BLOCKS[kind]
    n, k = shape
    b = raw.reshape(n, k // 32, nbytes)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":                      # q int8: w = d*q = d*(q + 128) - 128 d
        q = b[..., 2:].view(np.int8).astype(np.int16) + 128
        offset = -128 * d
    else:                                   # 16 bytes: weight j in the low nibble of byte j, j+16 high
        qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
        q = np.concatenate([qs & 15, qs >> 4], -1)
        offset = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d
    return GroupQuant(torch.from_numpy(q.astype(np.uint8).reshape(n, k)), torch.from_numpy(d),
                      torch.from_numpy(np.ascontiguousarray(offset, np.float32)), bits)


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value of a `gguf_file.GGUFFile` (decoded already), or `default`."""
    return reader.fields.get(key, default)


def _f32(value: Any) -> float:
    """Shortest decimal for a float32 metadata value (float32 1e-6 -> 1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _hf_name_from_gguf(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
    raise NotImplementedError(f"GGUF tensor {name!r} has no Hugging Face equivalent here (MoE or unusual variant?)")


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's `permute`: interleaved (GPT-J) rotary rows -> HF rotate_half halves, per head."""
    # w: [num_heads * head_dim, ...]; llama.cpp did reshape(H, 2, hd/2, ...).swapaxes(1, 2)
    rest = w.shape[1:]
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _gguf_config(reader: Any, arch: str, tensors: dict[str, Any]) -> ModelConfig:
    def meta(key: str, default: Any = None) -> Any:
        return _gguf_value(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    rope_dim = meta("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise NotImplementedError(f"partial rotary (rope dim {rope_dim} != head_dim {head_dim}) is not supported")
    theta = _f32(meta("rope.freq_base", 10000.0))
    eos = [_gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(meta("vocab_size", tensors["token_embd.weight"].shape[-1])),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        norm_eps=_f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_gguf_rope_scaling(meta, tensors, head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _gguf_rope_scaling(meta: Any, tensors: dict[str, Any], head_dim: int, theta: float) -> RopeScaling | None:
    if "rope_freqs.weight" in tensors:
        return _llama3_from_freq_factors(np.asarray(tensors["rope_freqs.weight"].data, np.float32), head_dim, theta)
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise NotImplementedError(f"GGUF rope scaling {kind!r} is not supported (linear, llama3)")
    return RopeScaling("linear", _f32(meta("rope.scaling.factor")))


def llama3_freq_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency wavelength divisors of llama3 rope scaling (what llama.cpp stores as rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old_len = scaling.original_max_position_embeddings
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    out = np.where(wavelen > old_len / scaling.low_freq_factor, scaling.factor, mid)
    return np.where(wavelen < old_len / scaling.high_freq_factor, 1.0, out)


def _llama3_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """GGUF keeps only the llama3 factors; recover the parameters assuming Meta's defaults for the rest."""
    if np.allclose(factors, 1.0):
        return None
    guess = RopeScaling("llama3", factor=_f32(factors.max()))
    if factors.shape != (head_dim // 2,) or not np.allclose(llama3_freq_factors(guess, head_dim, theta), factors,
                                                             rtol=1e-4):
        raise NotImplementedError("GGUF rope_freqs do not match llama3 scaling with low/high freq factors 1/4 "
                                  "and original context 8192; use the HF checkpoint instead")
    return guess


# ---------------------------------------------------------------- Hugging Face directory

def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a HF model directory or a .gguf file)")
    config = _hf_config(json.loads(config_file.read_text()))
    return config, _read_safetensors(_safetensors_files(path), dtype)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                                "(.bin checkpoints are not supported)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} listed in {index.name} is missing")
    return files


def _read_safetensors(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="Loading safetensors", unit="shard", disable=None if len(files) > 1 else True):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = key if key.startswith(("model.", "lm_head.")) else f"model.{key}"  # bare base-model keys
                state[name] = f.get_tensor(key).to(dtype).contiguous()
    return state


def _hf_config(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; choose one of {tuple(HF_MODEL_TYPES)}")
    if HF_MODEL_TYPES[model_type] == "opt":
        return _opt_config(cfg)
    return _llama_like_config(cfg, HF_MODEL_TYPES[model_type])


def _llama_like_config(cfg: dict[str, Any], arch: str) -> ModelConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise NotImplementedError("llama attention_bias/mlp_bias checkpoints are not supported")
    if cfg.get("use_sliding_window") or (arch == "llama" and cfg.get("sliding_window")):
        warnings.warn("sliding-window attention is ignored: full attention is used at every length", stacklevel=3)
    num_heads = cfg["num_attention_heads"]
    theta, scaling = _hf_rope(cfg)
    return ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
    )


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers<5: top-level rope_theta + rope_scaling; transformers 5: rope_parameters holds both."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise NotImplementedError(f"rope type {rope_type!r} is not supported (default, llama3, linear)")
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = {k: scaling[k] for k in keys if scaling.get(k) is not None}
    return theta, RopeScaling(rope_type, float(scaling["factor"]), **extra)


def _opt_config(cfg: dict[str, Any]) -> ModelConfig:
    hidden = cfg["hidden_size"]
    if cfg.get("word_embed_proj_dim", hidden) != hidden:
        raise NotImplementedError(f"OPT word_embed_proj_dim {cfg['word_embed_proj_dim']} != hidden_size {hidden} "
                                  "(project_in/project_out, e.g. opt-350m) is not supported")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise NotImplementedError("OPT without biases or LayerNorm affine parameters is not supported")
    if cfg.get("activation_function", "relu") != "relu" or cfg.get("_remove_final_layer_norm"):
        raise NotImplementedError("only ReLU OPT checkpoints with their final LayerNorm are supported")
    num_heads = cfg["num_attention_heads"]
    return ModelConfig(
        arch="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["ffn_dim"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
        do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
    )


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
