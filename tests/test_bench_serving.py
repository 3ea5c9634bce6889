"""Smoke test of the serving benchmark's pure parts (statistics, summary, report) on synthetic
numbers: no server, no model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import serving as bench  # noqa: E402

SETTINGS = bench.Settings(batches=(1, 2), prompt_len=8, output_len=5, kv_prompt_lens=(8, 32), kv_repeats=2, rounds=2)
PROCS = ("tritonserver", "benchmark client", "prefill stub", "decode stub", "orchestrator stub", "other processes")


def make_stream(t0: float, first_gap: float, step: float, n: int) -> dict:
    """n one-token chunks: prefill's at t0, decode's first `first_gap` later, then one per `step`."""
    chunks = [[t0, 1]] + [[t0 + first_gap + k * step, 1] for k in range(n - 1)]
    return {"chunks": chunks, "timing": make_timing(kv_bytes=1000, e2e_s=chunks[-1][0] - t0 + 0.1,
                                                    tpot_s=(chunks[-1][0] - t0) / (n - 1))}


def make_timing(kv_bytes: int, e2e_s: float, tpot_s: float = 0.05) -> dict:
    return {"kv_bytes": kv_bytes, "kv_transfer_s": kv_bytes / 5e9, "e2e_s": e2e_s, "tpot_s": tpot_s,
            "first_token_at": 100.0, "decode_admitted_at": 100.004}


def make_raw(s: bench.Settings, inproc_step: float, triton_steps: dict[int, float]) -> dict:
    raw: dict = {"inproc": {}, "triton": {}, "cpu": {}, "kv": {}}
    for b in s.batches:
        raw["inproc"][f"b{b}"] = [{"step_s": [inproc_step] * (s.output_len - 1),
                                   "step_cpu_s": [inproc_step * 0.9] * (s.output_len - 1)}] * s.rounds
        raw["triton"][f"b{b}"] = [[make_stream(0.01 * i, 0.2, triton_steps[b], s.output_len) for i in range(b)]
                                  for _ in range(s.rounds)]
        for who in ("inproc", "triton"):
            raw["cpu"][f"{who}_b{b}"] = [{p: 0.5 for p in PROCS}] * s.rounds
    raw["kv"] = {f"p{n}": [make_timing(n * 1000, 2.0)] * s.kv_repeats for n in s.kv_prompt_lens}
    raw["descriptor"] = {f"p{n}": {"prompt_tokens": n, "num_blocks": n // 16 or 1, "descriptor_bytes": 300,
                                   "prefill_result_bytes": 600, "decode_request_bytes": 900} for n in s.kv_prompt_lens}
    raw["kv_blocks_used_after"] = {"prefill-0": 0, "decode-0": 0}
    return raw


def test_steady_gaps_keep_only_the_time_all_streams_decode() -> None:
    a = [[0.0, 1], [1.0, 1], [1.5, 1], [2.0, 1], [2.5, 2], [3.0, 1]]     # decodes over [1.0, 3.0]
    b = [[0.5, 1], [2.0, 1], [2.5, 1], [3.0, 1], [3.5, 1]]                # decodes over [2.0, 3.5]
    gaps, concurrent = bench.steady_gaps([a, b])
    assert concurrent
    assert sorted(gaps) == pytest.approx([0.25, 0.5, 0.5, 0.5])       # a: 2.0->2.5 (2 tokens), 2.5->3.0; b: 2.0->3.0
    apart = [[0.0, 1], [1.0, 1], [1.1, 1], [1.2, 1]], [[5.0, 1], [6.0, 1], [6.3, 1]]
    gaps, concurrent = bench.steady_gaps(list(apart))
    assert not concurrent and sorted(gaps) == pytest.approx([0.1, 0.1, 0.3])   # never together: every gap


def test_tpot_summary_overheads_and_target() -> None:
    raw = make_raw(SETTINGS, 0.050, {1: 0.052, 2: 0.060})
    fast, slow = (bench.tpot_summary(raw["inproc"][k], raw["triton"][k], raw["cpu"][f"inproc_{k}"],
                                     raw["cpu"][f"triton_{k}"]) for k in ("b1", "b2"))
    assert fast["overhead"] == pytest.approx(0.04) and fast["overhead_paired"] == pytest.approx(0.04) and fast["met"]
    assert slow["overhead"] == pytest.approx(0.2) and not slow["met"]
    assert slow["all_decoding_at_once"] == [True, True]
    assert fast["server_tpot_s"] > fast["triton_s"]                   # the server's tpot_s spans the hand-off too


def test_quietest_round_is_the_one_with_least_foreign_cpu() -> None:
    inproc = [{"step_s": [0.05] * 4}] * 2
    triton = [[make_stream(0.0, 0.2, step, 5)] for step in (0.06, 0.051)]
    noisy, quiet = {"other processes": 5.0}, {"other processes": 1.0}
    t = bench.tpot_summary(inproc, triton, [noisy, quiet], [noisy, quiet])
    assert t["overhead_per_round"] == pytest.approx([0.2, 0.02]) and t["other_cpu_s"] == [[5.0, 5.0], [1.0, 1.0]]
    assert t["overhead_quietest_round"] == pytest.approx(0.02)


def test_kv_summary() -> None:
    k = bench.kv_summary([make_timing(12_000_000, 4.0), make_timing(12_000_000, 2.0), make_timing(12_000_000, 3.0)])
    assert k["kv_bytes"] == 12_000_000 and k["gb_s"] == pytest.approx(5.0)
    assert k["share"] == pytest.approx(2.4e-3 / 3.0) and k["max_share"] == pytest.approx(2.4e-3 / 2.0)
    assert k["handoff_s"] == pytest.approx(0.004) and k["handoff_share"] == pytest.approx(0.004 / 3.0)


def test_summary_and_report_files(tmp_path: Path) -> None:
    raw = make_raw(SETTINGS, 0.050, {1: 0.052, 2: 0.060})
    report = {"machine": bench.machine_info(["--quick"]), "model": "synthetic", "settings": bench.asdict(SETTINGS),
              "deployment": {"dtype": "bfloat16"}, **bench.summarize(raw, SETTINGS), "raw": raw}
    assert report["kv_met"] and report["tpot"]["b1"]["other_cpu_s"] == [[0.5, 0.5]] * SETTINGS.rounds
    tokens = SETTINGS.rounds * 2 * (SETTINGS.output_len - 1)
    assert report["cpu_ms_per_token"]["b2"]["decode stub"] == pytest.approx(1e3 * 0.5 * SETTINGS.rounds / tokens)
    out = tmp_path / "docs" / "bench_serving"
    bench.write_outputs(report, out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["tpot"]["b2"]["overhead"] == pytest.approx(0.2) and saved["machine"]["command"].endswith("--quick")
    md = out.with_suffix(".md").read_text()
    assert "+4.0%" in md and "+20.0%" in md and "**no**" in md and "python -m benchmarks.serving --quick" in md
    assert "descriptor 300 B" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(output_len=2), dict(batches=(0,))])
def test_settings_reject_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        bench.Settings(**bad)
