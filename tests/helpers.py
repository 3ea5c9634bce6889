"""Small factories for engine tests (vLLM-style make_* helpers)."""
from __future__ import annotations

from pathlib import Path

import torch

from backends.core.limits import EngineLimits
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.sampling import SamplingParams
from backends.core.sequence import Sequence

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def save_tiny_hf_model(arch: str, path: Path, seed: int = 0):
    """A random-weight HF model saved with save_pretrained; returns the HF model (eval, fp32)."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_theta=10000.0))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=True))
    else:
        raise ValueError(arch)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_engine(config, state_dict, **kw) -> LLMEngine:
    """An engine; the EngineLimits fields may be given flat (block_size=4, ...)."""
    kw.setdefault("dtype", "float32")
    limits = {k: kw.pop(k) for k in EngineLimits.__dataclass_fields__ if k in kw}
    return LLMEngine(config, state_dict, EngineConfig(limits=EngineLimits(**limits), **kw))


def run_to_completion(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    return tokens


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    tokens = run_to_completion(engine)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def prefill_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Last-position logits of one prompt through the engine's real prefill path."""
    seq = Sequence("probe", list(prompt), GREEDY)
    engine.seqs[seq.req_id] = seq
    engine.scheduler.add(seq)
    batch = engine.scheduler.schedule()
    logits = engine.runner.forward_logits(batch)[0]
    engine.abort(seq.req_id)
    return logits


def assert_no_leaks(engine: LLMEngine) -> None:
    assert engine.blocks.num_used == 0, f"{engine.blocks.num_used} KV blocks leaked"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.seqs and not engine.scheduler.waiting and not engine.scheduler.running
