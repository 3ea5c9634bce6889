"""planner/profile.py: a quick profile of a tiny model loads back; the measuring design and fit
recover known coefficients; the CLI writes the file `plan` reads."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from planner import profile
from planner.latency import LatencyModel, Link, load_profile
from planner.profile import PROFILE_KEY, Settings

TINY = Settings(prefill_batches=((8,), (32,), (96,), (8, 8, 8), (32, 64)), repeats=1,
                decode_batches=(1, 3), decode_contexts=(16, 80), mixed_batches=(4,),
                decode_steps=2, kv_copy_tokens=(16, 128))


def test_quick_profile_of_a_tiny_model_loads_back(tiny_llama, tmp_path):
    config, sd = tiny_llama
    doc = profile.run(config, sd, model_path=str(tmp_path / "tiny-llama"), dtype="float32",
                      settings=TINY, progress=False)
    path = tmp_path / "p.json"
    path.write_text(profile.dumps(doc))
    lat = load_profile(path).get("tiny-llama", "cpu-core", 1)
    assert lat.prefill == tuple(doc["entries"][0]["prefill"])
    info = profile.profile_info(path)
    assert info["model"] == "tiny-llama" and info["device"] == "cpu-core" and info["tp"] == 1
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4        # K+V, 2 layers, 2 heads x 16, fp32
    assert info["kv_dtype"] == "float32"                             # "auto": the activations'
    assert info["kv_link"]["bandwidth_Bps"] > 0
    samples = info["samples"]
    assert len(samples["prefill"]) == len(TINY.prefill_batches)
    assert len(samples["decode"]) == len(TINY.decode_batches) * len(TINY.decode_contexts) + 1
    for s in samples["prefill"] + samples["decode"]:
        assert s["median_s"] > 0 and s["predicted_s"] == pytest.approx(s["median_s"] * (1 + s["rel_err"]))
    mixed = samples["decode"][-1]
    assert mixed["batch_size"] == 4 and len(set(mixed["ctx"])) > 1
    for part in ("prefill", "decode"):
        assert info["fit"][part]["num_samples"] > 3 and info["fit"][part]["r2"] <= 1.0


def test_long_lengths_are_clipped_to_the_models_context():
    s = Settings().clipped(256)
    assert max(max(b) for b in s.prefill_batches) == 255
    assert max(s.decode_contexts) + s.warmup_steps + s.decode_steps + 2 <= 256
    assert len(set(s.prefill_batches)) == len(s.prefill_batches)       # clipped duplicates dropped


class FakeProbe:
    """Known step costs (with 2% noise) in place of the engine."""

    def __init__(self, truth: LatencyModel, link: Link, seed: int = 0) -> None:
        self.truth, self.link = truth, link
        self.rng = np.random.default_rng(seed)

    def _noisy(self, t: float) -> float:
        return t * (1 + self.rng.normal(0, 0.02))

    def prefill(self, lens):
        return self._noisy(self.truth.prefill_time(lens))

    def decode(self, ctxs, warmup, steps):
        totals = [sum(ctxs) + i * len(ctxs) + len(ctxs) for i in range(warmup, warmup + steps)]
        return [self._noisy(self.truth.decode_time(len(ctxs), t)) for t in totals], totals

    def kv_copy(self, num_tokens):
        nbytes = num_tokens * 1000
        return self._noisy(self.link.transfer_time(nbytes)), nbytes


def test_the_default_design_recovers_known_coefficients():
    """The default configurations identify every coefficient (none is collinear with another)."""
    truth = LatencyModel("m", "cpu-core", 1, (0.06, 1.7e-3, 1.4e-6), (0.07, 8e-6, 2.8e-3),
                         (0.07, 8e-6, 2.8e-3))
    link = Link(4e9, 50e-6)
    samples = profile.measure(FakeProbe(truth, link), Settings(), 8192, progress=False)
    lat, details = profile.fit(samples, "m")
    np.testing.assert_allclose(lat.prefill, truth.prefill, rtol=0.15)
    np.testing.assert_allclose(lat.decode_small, truth.decode_small, rtol=0.15)
    assert details["fit"]["prefill"]["r2"] > 0.99 and details["fit"]["decode"]["r2"] > 0.95
    assert details["fit"]["prefill"]["median_rel_err"] < 0.03
    fitted = profile.fit_link(samples.kv_copy)
    assert fitted.bandwidth_Bps == pytest.approx(link.bandwidth_Bps, rel=0.1)


def test_fit_link_of_flat_times_is_still_a_link():
    flat = [{"tokens": 1, "bytes": 100, "times_s": [1e-3]}, {"tokens": 2, "bytes": 200, "times_s": [1e-3]}]
    assert profile.fit_link(flat).bandwidth_Bps == pytest.approx(2e5)


def test_model_name_is_the_file_name():
    assert profile.model_name("models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert profile.model_name("/x/TinyLlama/") == "tinyllama"


def test_cli_profile_writes_the_file_plan_reads(tmp_path, monkeypatch, capsys):
    import backends.core.model_runner as runner
    from planner.__main__ import main
    from tests.helpers import save_tiny_hf_model

    pinned = []
    monkeypatch.setattr(runner, "pin_threads", lambda cores, n=None: pinned.append((cores, n)))
    monkeypatch.setattr(profile, "QUICK", replace(TINY, repeats=2))
    save_tiny_hf_model("llama", tmp_path / "tiny")
    out = tmp_path / "docs" / "profile.json"
    assert main(["profile", "--model", str(tmp_path / "tiny"), "--dtype", "float32", "--quick",
                 "--no-progress", "--out", str(out)]) == 0
    assert pinned and pinned[0][1] == 1                     # one core, one thread
    info = json.loads(out.read_text())[PROFILE_KEY]
    assert info["command"].startswith("python -m planner profile --model")
    assert len(info["load_avg_before"]) == 3 and info["machine"]["core"] == pinned[0][0][0]
    assert "R^2" in capsys.readouterr().out
    assert load_profile(out).get("tiny", "cpu-core", 1).tp == 1
