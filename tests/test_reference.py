"""Our engine against HF transformers as the oracle (float32)."""
from __future__ import annotations

import pytest
import torch

from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch
from backends.core.sequence import Sequence
from backends.core.weights import load_checkpoint
from tests.helpers import assert_no_leaks, make_engine, prefill_logits, save_tiny_hf_model

RTOL = 1e-4     # relative to the largest |logit|: fp32 differs only in summation order


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * max|ref| ({scale:.3g})"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf_model(request.param, path)
    config, sd = load_checkpoint(path, torch.float32)
    return hf, config, sd


@pytest.mark.parametrize("block_size", [4, 16])
def test_tiny_prefill_and_24_decode_steps_match_hf(tiny, block_size):
    hf, config, sd = tiny
    engine = make_engine(config, sd, block_size=block_size, num_kv_blocks=64)
    prompt = torch.randint(0, 128, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence("a", prompt, SamplingParams(max_tokens=26, temperature=0, ignore_eos=True))
    engine.seqs["a"] = seq
    engine.scheduler.add(seq)
    ids = list(prompt)
    for step in range(25):
        batch = engine.scheduler.schedule()
        assert batch.is_prefill == (step == 0)
        logits = engine.runner.forward_logits(batch)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        _close(logits, ref)
        token = int(logits.argmax())
        assert token == int(ref.argmax())
        engine.scheduler.update(batch, [token])     # max_tokens 26: never stops here
        ids.append(token)
    engine.abort("a")
    assert_no_leaks(engine)


def test_tiny_greedy_generate_matches_hf(tiny):
    hf, config, sd = tiny
    engine = make_engine(config, sd, block_size=8, num_kv_blocks=64)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 40)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.req_id, []).extend(o.new_token_ids)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert outs[f"r{i}"] == ref[0, len(p):].tolist()
    assert_no_leaks(engine)


PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    ",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a land far away, there lived a " * 6]


def test_smollm_gguf_prefill_logits_match_hf(smollm_fp32, smollm_tokenizer, hf_default_model):
    # Same GGUF, both sides dequantize to float32; observed max |diff| ~3e-5 on logits of
    # magnitude ~20 (1.6e-6 relative), so 1e-4 relative leaves 60x headroom for BLAS
    # summation-order differences on other CPUs while catching any real mismatch
    # (a wrong RoPE layout or norm gives errors of order 1).
    config, sd = smollm_fp32
    engine = make_engine(config, sd, num_kv_blocks=64)
    for text in PROMPTS:
        ids = smollm_tokenizer.encode(text)
        ours = prefill_logits(engine, ids)
        with torch.no_grad():
            ref = hf_default_model(torch.tensor([ids])).logits[0, -1].float()
        _close(ours, ref)
        assert int(ours.argmax()) == int(ref.argmax())
    assert_no_leaks(engine)


def test_prefill_in_two_chunks_matches_one_pass(tiny):
    """A prefill chunk after a cached prefix (the chunked-prefill path) reads the prefix back
    through the block table."""
    hf, config, sd = tiny
    engine = make_engine(config, sd, block_size=4, num_kv_blocks=64)
    prompt = torch.randint(0, 128, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    seq = Sequence("a", prompt[:7], SamplingParams(temperature=0))
    engine.seqs["a"] = seq
    engine.scheduler.add(seq)
    engine.runner.forward_logits(engine.scheduler.schedule())
    seq.num_cached = 7                  # the runner is pure: what the scheduler's update does
    seq.prompt_ids += prompt[7:]
    seq.num_tokens = len(seq.prompt_ids)    # (kept by append_token; this test extends the prompt)
    seq.block_ids += engine.blocks.allocate(-(-19 // 4) - len(seq.block_ids))
    chunk = Batch()
    chunk.add(seq, 19 - 7)
    logits = engine.runner.forward_logits(chunk)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    _close(logits, ref)
    engine.abort("a")
    assert_no_leaks(engine)
