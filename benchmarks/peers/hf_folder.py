"""The benchmark's model as a Hugging Face folder, for peers that do not read GGUF (vLLM).

Written from our own loader, so every subject runs the same numbers: `load_checkpoint` dequantizes
the GGUF (Q/K rows un-permuted) into HF-named tensors in the requested dtype; they go to
model.safetensors (lm_head left out when tied). config.json is a plain LlamaConfig (no
`quantization_config`: the peer sees dense weights); tokenizer.json is our tokenizer's BPE.
Runs in our venv; the folder is rewritten only when the source checkpoint changes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

STAMP = "source.json"


def _source_stamp(model: Path, dtype: str) -> dict:
    st = model.stat()
    return {"source": str(model.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}


def hf_folder(model: str | Path, out_root: str | Path, dtype: str = "bfloat16") -> Path:
    """Path of the HF folder for `model` under `out_root`, written first if missing or stale."""
    model = Path(model)
    out = Path(out_root) / f"{model.stem}-{dtype}-hf"
    stamp = _source_stamp(model, dtype)
    if (out / STAMP).exists() and json.loads((out / STAMP).read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_hf_folder(model, tmp, dtype)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_hf_folder(model: Path, out: Path, dtype: str) -> None:
    from backends.core.model_runner import DTYPES
    from backends.core.tokenizer import Tokenizer
    from backends.core.weights import load_checkpoint

    config, sd = load_checkpoint(model, DTYPES[dtype])
    write_model_files(config, sd, out, dtype)
    del sd
    _write_tokenizer(Tokenizer.load(model), out, config)


def write_model_files(config, sd: dict, out: Path, dtype: str) -> None:
    """config.json (a plain LlamaConfig) and model.safetensors (HF names, lm_head left out if tied)."""
    from safetensors.torch import save_file

    from benchmarks.engine_subjects import hf_config

    cfg = hf_config(config).to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype=dtype, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(tok, out: Path, config) -> None:
    tok.backend.save(str(out / "tokenizer.json"))
    name = tok.backend.id_to_token
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos,
               "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    for key, token_id in (("bos_token", tok.bos_token_id), ("eos_token", tok.eos_token_id),
                          ("pad_token", tok.pad_token_id)):
        if token_id is not None:
            tok_cfg[key] = name(token_id)
    if tok.chat_template:
        tok_cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
