"""Smoke test of the engine benchmark harness on a tiny random Llama (not a performance test)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.core.weights import load_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import engine as bench  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
SETTINGS = bench.Settings(batches=(1, 2), prompt_len=8, decode_steps=2, prefill_lens=(8, 16), prefill_repeats=1,
                          rounds=2)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return load_checkpoint(path, torch.float32)


def test_hf_baseline_has_our_weights(tiny_checkpoint) -> None:
    config, sd = tiny_checkpoint
    hf = bench.build_hf(config, sd, "float32")
    ours = bench.build_ours(config, sd, "float32", SETTINGS)
    ids = bench._prompts(1, 8, config.vocab_size)
    with torch.inference_mode():
        ref = hf(ids).logits[0, -1]
    logits = ours.runner.forward_logits(_prefill_batch(ours, ids[0].tolist()))[0]
    torch.testing.assert_close(logits, ref.float(), atol=1e-4, rtol=1e-4)


def _prefill_batch(engine, prompt_ids):
    bench._add(engine, torch.tensor([prompt_ids]), 1)
    return engine.scheduler.schedule()


def test_run_writes_report(tiny_checkpoint, tmp_path: Path) -> None:
    config, sd = tiny_checkpoint
    report = bench.run(config, sd, "float32", SETTINGS)
    assert set(report["configs"]) == {"decode_b1", "decode_b2", "prefill_8", "prefill_16"}
    for c in report["configs"].values():
        assert c["ours"]["tok_s"] > 0 and c["hf"]["tok_s"] > 0 and c["ratio"] > 0
    assert len(report["configs"]["decode_b2"]["ours"]["times_s"]) == SETTINGS.rounds * SETTINGS.decode_steps
    assert len(report["bound"]["times_s"]) == SETTINGS.rounds * SETTINGS.decode_steps
    assert [r["target"] for r in report["ratios"]] == [bench.TARGET_VS_HF, bench.TARGET_SCALING, None, None]

    report = {"machine": bench.machine_info("float32", 0, ["--model", "tiny"]), "model": "tiny", **report}
    out = tmp_path / "docs" / "bench_engine"
    bench.write_outputs(report, out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert {"machine", "settings", "model_config", "configs", "bound", "ratios"} <= set(saved)
    assert {"cpu_model", "torch", "dtype", "command", "timestamp"} <= set(saved["machine"])
    md = out.with_suffix(".md").read_text()
    assert "| decode, batch 2 |" in md and "ours / HF, batch-1 decode" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_settings_need_batch_one() -> None:
    with pytest.raises(ValueError, match="include 1"):
        bench.Settings(batches=(2, 4))
