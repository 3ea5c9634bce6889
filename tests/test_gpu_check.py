"""./build.sh gpu-check (benchmarks/gpu_check.py) where there is no GPU: it says why, skips every
step and exits 0; and the step runner's PASS / FAIL / SKIP bookkeeping."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")
def test_without_a_gpu_it_says_why_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if torch.version.cuda is None:
        assert f"torch {torch.__version__} is a CPU build: the GPU checks need a CUDA build of torch" \
            in proc.stdout
    assert proc.stdout.count("[SKIP]") == len(gpu_check.STEPS)
    assert "0 passed, 0 failed, 4 skipped (no GPU checks ran on this host)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["cuda_usable"] is False and report["cuda"] in proc.stdout
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert {s["status"] for s in report["steps"]} == {"SKIP"}


def test_a_cuda_build_that_sees_no_gpu_names_the_driver_error(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usable, why = gpu_check.cuda_status()
    assert not usable
    assert why.startswith(f"torch {torch.__version__} (CUDA 12.4) sees no GPU (")
    assert "cudaGetDeviceCount" in why or "cuda-python" in why


def test_no_torch_at_all_is_said_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch raises ImportError
    usable, why = gpu_check.cuda_status()
    assert not usable and why.startswith("torch is not importable")


def test_steps_report_pass_fail_skip_and_a_failure_exits_1(tmp_path, monkeypatch, capsys):
    def fails() -> tuple[str, dict]:
        raise AssertionError("logits differ")

    def skips() -> tuple[str, dict]:
        raise gpu_check.Skip("nvidia-pytriton is not installed")
    steps = {"engine": lambda: ("fine", {"x": 1}), "kv": fails, "serve": skips}
    monkeypatch.setattr(gpu_check, "cuda_status", lambda: (True, "1 GPU(s), a fake one"))
    monkeypatch.setattr(gpu_check, "plan", lambda args: steps)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out), "--steps", "engine,kv,serve"]) == 1
    text = capsys.readouterr().out
    assert "[PASS] engine: fine" in text and "[FAIL] kv: AssertionError: logits differ" in text
    assert "[SKIP] serve: nvidia-pytriton is not installed" in text
    report = json.loads(out.read_text())
    assert [s["status"] for s in report["steps"]] == ["PASS", "FAIL", "SKIP"]
    assert "Traceback" in report["steps"][1]["details"]["traceback"]
    assert report["summary"] == "gpu-check: 1 passed, 1 failed, 1 skipped"


def test_model_missing_is_a_skip_and_bad_step_names_are_refused(tmp_path, capsys):
    import argparse
    args = argparse.Namespace(model=str(tmp_path / "none.gguf"), device="cuda:0", steps=["engine"])
    result = gpu_check.run_step("engine", gpu_check.plan(args)["engine"])
    assert result.status == "SKIP" and "not found" in result.reason
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "engine,warp"])
    assert "steps are some of engine,kv,serve,speed" in capsys.readouterr().err


def test_the_gpu_deployment_puts_both_phases_on_the_gpu(tmp_path):
    d = gpu_check.gpu_deployment(tmp_path / "m.gguf", 0)
    assert d.prefill.device == d.decode.device == "gpu" and d.prefill.devices == (0,)
    assert d.kv_transport == "cuda_ipc" and Path(d.model_path).is_absolute()
