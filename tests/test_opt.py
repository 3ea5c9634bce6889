"""OPTCausalLM through the engine against transformers' OPTForCausalLM (tiny random models, float32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.opt import OPTCausalLM
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch
from backends.core.sequence import Sequence
from backends.core.weights import load_checkpoint

transformers = pytest.importorskip("transformers")

TINY_OPT = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128, vocab_size=128,
                max_position_embeddings=256, word_embed_proj_dim=64,
                init_std=0.2)   # HF's default 0.02 gives a model that repeats one token whatever the context
REL_TOL = 1e-4
NUM_DECODE = 24


def make_hf(tmp_path: Path, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**TINY_OPT, **overrides})).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def make_engine(path: Path) -> LLMEngine:
    config, sd = load_checkpoint(path, torch.float32)
    return LLMEngine(config, sd, EngineConfig(dtype="float32",
                                              limits=EngineLimits(block_size=4, num_kv_blocks=64)))


def make_prompt(n: int, seed: int = 1) -> list[int]:
    # ids >= 3 keep clear of OPT's pad (1) and bos/eos (2): generate() would infer a mask from pads
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_OPT["vocab_size"], (n,), generator=gen).tolist()


def hf_next_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """HF's full-sequence forward: last-position logits [V] float32."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    # relative to the logits' scale, so entries near zero do not dominate
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"max relative logit error {err:.2e} > {tol:.0e}"


def record_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Spy on the runner: every step's logits [B, V] are appended to the returned list."""
    seen: list[torch.Tensor] = []
    forward = engine.runner.forward_logits

    def spy(batch: Batch) -> torch.Tensor:
        logits = forward(batch)
        seen.append(logits.clone())
        return logits

    engine.runner.forward_logits = spy
    return seen


def run_greedy(engine: LLMEngine, prompts: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for req_id, prompt in prompts.items():
        engine.add_request(req_id, prompt, params)
    out: dict[str, list[int]] = {req_id: [] for req_id in prompts}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.req_id] += o.new_token_ids
    return out


def test_engine_builds_opt(tmp_path: Path) -> None:
    make_hf(tmp_path)
    engine = make_engine(tmp_path)
    assert isinstance(engine.runner.model, OPTCausalLM)
    assert engine.runner.model.lm_head.weight is engine.runner.model.embed_tokens.weight


def test_prefill_logits_match_hf(tmp_path: Path) -> None:
    hf = make_hf(tmp_path)
    engine = make_engine(tmp_path)
    prompt = make_prompt(13)
    engine.scheduler.add(Sequence("a", prompt, SamplingParams(temperature=0.0)))
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.is_prefill and len(batch.seqs) == 1
    logits = engine.runner.forward_logits(batch)                             # [1, V]
    assert logits.dtype == torch.float32 and logits.shape == (1, TINY_OPT["vocab_size"])
    assert_rel_close(logits[0], hf_next_logits(hf, prompt))
    engine.scheduler.finish(batch.seqs[0])
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
def test_greedy_decode_matches_hf(tmp_path: Path, pre_norm: bool) -> None:
    hf = make_hf(tmp_path, do_layer_norm_before=pre_norm)
    engine = make_engine(tmp_path)
    assert engine.model_config.do_layer_norm_before is pre_norm
    assert (engine.runner.model.final_layer_norm is not None) is pre_norm
    prompt = make_prompt(13)
    seen = record_logits(engine)
    tokens = run_greedy(engine, {"a": prompt}, NUM_DECODE)["a"]

    expected = hf_greedy(hf, prompt, NUM_DECODE)
    assert len(expected) == NUM_DECODE and len(set(expected)) > 4     # a context-sensitive model
    assert tokens == expected
    assert len(seen) == NUM_DECODE          # one prefill step, then one decode step per token
    for step, logits in enumerate(seen):
        assert_rel_close(logits[0], hf_next_logits(hf, prompt + tokens[:step]))
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_batched_requests_match_hf(tmp_path: Path) -> None:
    """Packed prefill of different lengths and batched decode give each request HF's tokens."""
    hf = make_hf(tmp_path)
    engine = make_engine(tmp_path)
    prompts = {"a": make_prompt(13, seed=1), "b": make_prompt(5, seed=2), "c": make_prompt(9, seed=3)}
    out = run_greedy(engine, prompts, NUM_DECODE)
    for req_id, prompt in prompts.items():
        assert out[req_id] == hf_greedy(hf, prompt, NUM_DECODE), req_id
    assert engine.blocks.num_used == 0 and not engine.seqs
    assert not engine.scheduler.waiting and not engine.scheduler.running
