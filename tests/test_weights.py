"""load_checkpoint against transformers: tiny random HF models, synthetic GGUFs, and the real SmolLM2 GGUF."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.core.config import ModelConfig, RopeScaling
from backends.core.weights import expected_param_names, llama3_freq_factors, load_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def make_model(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "opt":
        opt = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                   word_embed_proj_dim=64, max_position_embeddings=128)
        cfg = transformers.OPTConfig(**{**opt, **overrides})
        return transformers.OPTForCausalLM(cfg).eval()
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    return model_cls(config_cls(**{**TINY, **overrides})).eval()


def assert_same_state(ours: dict[str, torch.Tensor], model: torch.nn.Module, dtype: torch.dtype,
                      atol: float = 0.0) -> None:
    ref = model.state_dict()
    ref_names = set(ref)
    if model.config.tie_word_embeddings and "lm_head.weight" not in ours:
        ref_names.discard("lm_head.weight")
    assert set(ours) == ref_names
    for name, tensor in ours.items():
        assert tensor.dtype == dtype and tensor.is_contiguous(), name
        expected = ref[name].to(dtype)
        assert tensor.shape == expected.shape, name
        torch.testing.assert_close(tensor, expected, atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------- Hugging Face directories

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_gqa(tmp_path: Path, dtype: torch.dtype) -> None:
    model = make_model("llama", rms_norm_eps=1e-5, rope_theta=5e5, bos_token_id=1, eos_token_id=[2, 3])
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, state = load_checkpoint(tmp_path, dtype)
    assert config == ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                                 norm_eps=1e-5, rope_theta=5e5, bos_token_id=1, eos_token_ids=(2, 3))
    assert_same_state(state, model, dtype)
    assert sorted(state) == sorted(expected_param_names(config))


def test_llama3_rope_sharded(tmp_path: Path) -> None:
    model = make_model("llama", rope_scaling=dict(LLAMA3), rope_theta=5e5, tie_word_embeddings=True)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    config, state = load_checkpoint(tmp_path, torch.float32)
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert config.rope_theta == 5e5 and config.tie_word_embeddings
    assert "lm_head.weight" not in state
    assert_same_state(state, model, torch.float32)


def test_legacy_rope_keys(tmp_path: Path) -> None:
    """transformers<5 configs: top-level rope_theta and rope_scaling with "type"."""
    make_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 2.0}, head_dim=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config, _ = load_checkpoint(tmp_path, torch.float32)
    assert config.rope_theta == 1234.0 and config.rope_scaling == RopeScaling("linear", 2.0)
    assert config.head_dim == 16


def test_qwen2(tmp_path: Path) -> None:
    model = make_model("qwen2", tie_word_embeddings=True, eos_token_id=7)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, state = load_checkpoint(tmp_path, torch.bfloat16)
    assert (config.arch, config.qkv_bias, config.tie_word_embeddings) == ("qwen2", True, True)
    assert (config.num_kv_heads, config.eos_token_ids, config.norm_eps) == (2, (7,), 1e-6)
    assert "model.layers.1.self_attn.k_proj.bias" in state
    assert_same_state(state, model, torch.bfloat16)


def test_opt(tmp_path: Path) -> None:
    model = make_model("opt")
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, state = load_checkpoint(tmp_path, torch.float32)
    assert config == ModelConfig(arch="opt", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=128,
                                 tie_word_embeddings=True, qkv_bias=True, bos_token_id=2, eos_token_ids=(2,))
    assert state["model.decoder.embed_positions.weight"].shape == (130, 64)   # offset of 2
    assert_same_state(state, model, torch.float32)


def test_opt_projection_rejected(tmp_path: Path) -> None:
    make_model("opt", word_embed_proj_dim=32).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(NotImplementedError, match="word_embed_proj_dim"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- errors

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_dir_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="llama.*qwen2.*opt"):
        load_checkpoint(tmp_path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path, torch.float16)


def test_unsupported_gguf_arch(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match="llama.*qwen2"):
        load_checkpoint(tmp_path / "m.gguf")


# ---------------------------------------------------------------- synthetic GGUF (llama.cpp conventions)

_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base, _, suffix = hf_name.rpartition(".")
    if base in glob:
        return f"{glob[base]}.{suffix}"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model: torch.nn.Module, path: Path, arch: str) -> None:
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    head_dim = c.hidden_size // c.num_attention_heads
    if c.rope_parameters.get("rope_type") == "llama3":
        scaling = RopeScaling(**{k: v for k, v in c.rope_parameters.items() if k != "rope_theta"})
        factors = llama3_freq_factors(scaling, head_dim, c.rope_parameters["rope_theta"])
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            w = _llama_cpp_permute(w, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w, dtype=np.float32))
    _finish(writer)


def test_gguf_llama_unpermutes_qk(tmp_path: Path) -> None:
    model = make_model("llama", rope_scaling={**LLAMA3, "original_max_position_embeddings": 8192}, rope_theta=5e5,
                       max_position_embeddings=16384)
    write_gguf(model, tmp_path / "m.gguf", "llama")
    config, state = load_checkpoint(tmp_path / "m.gguf", torch.float32)
    assert config == ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=16384,
                                 norm_eps=1e-6, rope_theta=5e5, rope_scaling=RopeScaling("llama3", 8.0),
                                 bos_token_id=1, eos_token_ids=(2,))
    assert_same_state(state, model, torch.float32)


def test_gguf_qwen2_biases_no_permute(tmp_path: Path) -> None:
    model = make_model("qwen2", tie_word_embeddings=True)
    write_gguf(model, tmp_path / "m.gguf", "qwen2")
    config, state = load_checkpoint(tmp_path / "m.gguf", torch.bfloat16)
    assert (config.arch, config.qkv_bias, config.tie_word_embeddings) == ("qwen2", True, True)
    assert_same_state(state, model, torch.bfloat16)


# ---------------------------------------------------------------- the real default model

def test_real_model_matches_transformers(gguf_path: Path, hf_default_model: torch.nn.Module) -> None:
    path, model = gguf_path, hf_default_model
    config, state = load_checkpoint(path, torch.float32)
    hf = model.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (
        hf.hidden_size, hf.intermediate_size, hf.vocab_size)
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert_same_state(state, model, torch.float32, atol=1e-6)
    if path.name.startswith("SmolLM2-135M"):
        assert config == ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                     num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                     max_position_embeddings=8192, norm_eps=1e-5, rope_theta=1e5,
                                     tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
