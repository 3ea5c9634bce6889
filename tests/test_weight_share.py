"""Shared weights (backends/core/weight_share.py): real processes map one read-only copy; the
file and directory stay private; a stale file, a bad key or an unsafe directory fail clearly."""
from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from backends.core import weight_share as ws
from backends.core.weight_share import WeightShareError, share_module, weights_key
from backends.core.weight_share_cuda import process_start, share_module_cuda

KEY = "0123456789abcdef0123456789abcdef"


class Tiny(nn.Module):
    """Tied embedding/head, float32 linears, a uint8 'packed' buffer and a bf16 scale."""

    def __init__(self, dim: int = 64, vocab: int = 96, num_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("packed", torch.randint(0, 256, (dim, dim // 2), dtype=torch.uint8))
        self.register_buffer("scale", torch.rand(dim, dtype=torch.bfloat16))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        x = x + self.packed.float().mean(-1) * self.scale.float()
        return self.head(x)


IDS = torch.arange(8)


def pss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line in /proc/self/smaps_rollup")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the module's distinct (private) storages."""
    return sum(s.nbytes() for s in ws.make_plan(ws.named_tensors(model)).storages)


def _child(directory: str, barrier, results) -> None:
    torch.set_num_threads(1)
    model = Tiny(dim=1024, vocab=512, num_layers=4)
    ref, num_bytes = model(IDS), weight_bytes(model)
    barrier.wait()                          # both built, private copies touched
    private = pss_kib()
    barrier.wait()
    info = share_module(model, directory, KEY)
    out = model(IDS)                        # touches every shared page the model reads
    barrier.wait()                          # both mapped
    shared = pss_kib()
    barrier.wait()                          # both measured before either exits
    tied = model.head.weight is model.embed.weight
    results.put({"wrote": info.wrote, "equal": torch.equal(out, ref), "tied": tied,
                 "private_kib": private, "shared_kib": shared, "weight_bytes": num_bytes,
                 "pid": os.getpid()})


def run_pair(target, directory: Path, timeout_s: float) -> list[dict]:
    """Run `target(directory, barrier, results)` in two spawned processes; their results."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(directory), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=timeout_s) for _ in procs]
    for p in procs:
        p.join(timeout_s)
        assert p.exitcode == 0
    return got


def test_two_processes_map_one_copy(tmp_path):
    directory = tmp_path / "shared"
    got = run_pair(_child, directory, 60)
    assert sorted(r["wrote"] for r in got) == [False, True]       # one writer, one attacher
    assert all(r["equal"] and r["tied"] for r in got)
    half_kib = got[0]["weight_bytes"] / 2 / 1024
    for r in got:                           # each process now holds half a copy, not a whole one
        assert r["private_kib"] - r["shared_kib"] > 0.7 * half_kib, r
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / f"{KEY}.weights").stat().st_mode) == 0o600


def test_share_in_process_keeps_outputs_and_ties_and_maps_read_only(tmp_path):
    model = Tiny()
    ref = model(IDS)
    info = share_module(model, tmp_path / "d", KEY)
    assert info.wrote and info.role == "wrote" and info.num_storages == 7   # embed = head: one storage
    assert info.num_bytes >= weight_bytes(Tiny()) and info.path == tmp_path / "d" / f"{KEY}.weights"
    assert torch.equal(model(IDS), ref)
    assert model.head.weight is model.embed.weight
    assert model.packed.dtype == torch.uint8 and model.scale.dtype == torch.bfloat16
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(info.path))]
    assert maps and all(m[1] == "r--s" for m in maps)    # read-only, MAP_SHARED
    assert ws.shared_info(model) is info and share_module(model, tmp_path / "other", "f" * 16) is info
    assert not (tmp_path / "other").exists()          # already shared: a no-op
    again = Tiny()
    assert ws.shared_info(again) is None
    second = share_module(again, tmp_path / "d", KEY)
    assert not second.wrote and second.num_bytes == info.num_bytes
    assert torch.equal(again(IDS), ref)
    assert not list((tmp_path / "d").glob(".*.tmp"))


def test_stale_file_with_the_same_key_is_refused(tmp_path):
    share_module(Tiny(), tmp_path, KEY)
    for other in (Tiny(dim=32), Tiny(num_layers=3)):
        ref = other(IDS)
        with pytest.raises(WeightShareError, match="stale file with the same key"):
            share_module(other, tmp_path, KEY)
        assert torch.equal(other(IDS), ref)     # untouched: still its private weights
    cast = Tiny()
    cast.scale = cast.scale.float()
    with pytest.raises(WeightShareError, match=r"buffer:scale is .*'float32'.* here"):
        share_module(cast, tmp_path, KEY)


def test_truncated_or_foreign_file_is_refused(tmp_path):
    info = share_module(Tiny(), tmp_path, KEY)
    with open(info.path, "r+b") as f:
        f.truncate(info.path.stat().st_size - 64)
    with pytest.raises(WeightShareError, match="its index says"):
        share_module(Tiny(), tmp_path, KEY)
    info.path.write_bytes(b"not a weights file at all")
    with pytest.raises(WeightShareError, match="bad header"):
        share_module(Tiny(), tmp_path, KEY)


@pytest.mark.parametrize("key", ["../../etc/passwd", "0123456789ABCDEF", "abc", "g" * 20, "a" * 65, 7])
def test_bad_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="16-64 lowercase hex"):
        share_module(Tiny(), tmp_path, key)
    assert not list(tmp_path.iterdir())


def test_unsafe_directories_are_refused(tmp_path, monkeypatch):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        share_module(Tiny(), open_dir, KEY)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "private", target_is_directory=True)
    (tmp_path / "private").mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="not a directory"):
        share_module(Tiny(), link, KEY)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(PermissionError, match="not to us"):
        share_module(Tiny(), tmp_path / "private", KEY)


def test_lock_timeout_and_non_cpu_tensors(tmp_path):
    with ws.locked(tmp_path / f"{KEY}.lock", 1.0):
        with pytest.raises(TimeoutError, match="another instance holds it"):
            share_module(Tiny(), tmp_path, KEY, lock_timeout_s=0.1)
    with torch.device("meta"):
        meta = Tiny()
    with pytest.raises(ValueError, match="use share_module_cuda"):
        share_module(meta, tmp_path, KEY)


def test_weights_key():
    key = weights_key("/m/model.gguf", "1234", "1700000000", "int4", "bfloat16")
    assert ws.KEY_PATTERN.fullmatch(key) and len(key) == 32
    assert key == weights_key("/m/model.gguf", "1234", "1700000000", "int4", "bfloat16")
    assert key != weights_key("/m/model.gguf", "1234", "1700000000", "bf16", "bfloat16")
    assert weights_key("a", "bc") != weights_key("ab", "c")
    with pytest.raises(ValueError):
        weights_key("a", 3)


def test_checkpoint_key_follows_the_file(tmp_path):
    ckpt = tmp_path / "m.gguf"
    ckpt.write_bytes(b"x" * 10)
    key = ws.checkpoint_key(ckpt, "int4", "bfloat16")
    assert key == ws.checkpoint_key(ckpt, "int4", "bfloat16") != ws.checkpoint_key(ckpt, "bf16", "bfloat16")
    ckpt.write_bytes(b"x" * 11)
    assert ws.checkpoint_key(ckpt, "int4", "bfloat16") != key
    (tmp_path / "config.json").write_text("{}")
    assert ws.KEY_PATTERN.fullmatch(ws.checkpoint_key(tmp_path, "bf16"))


def test_share_weights_dispatches_on_the_device(tmp_path):
    info = ws.share_weights(Tiny(), tmp_path, KEY, torch.device("cpu"))
    assert info.device == "cpu" and info.wrote


def test_process_start_names_a_live_process():
    assert isinstance(process_start(os.getpid()), int)
    assert process_start(2 ** 22 + 1) is None


def _cuda_available() -> bool:
    try:
        from cuda.bindings import runtime as cudart
        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0 and torch.cuda.is_available()
    except Exception:
        return False


HAS_GPU = _cuda_available()


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path")
def test_cuda_sharing_without_gpu_fails_clearly(tmp_path):
    from kvtransfer import CudaUnavailableError
    with pytest.raises(CudaUnavailableError, match=r"^sharing weights over CUDA IPC: .*needs an NVIDIA "
                                                   r"GPU and driver: cudaGetDeviceCount"):
        share_module_cuda(Tiny(), tmp_path, KEY, 0)
    assert not list(tmp_path.iterdir())


def _gpu_child(directory: str, barrier, results) -> None:
    model = Tiny().cuda()
    ref = model(IDS.cuda()).cpu()
    barrier.wait()
    info = share_module_cuda(model, directory, KEY, 0)
    out = model(IDS.cuda()).cpu()
    results.put({"wrote": info.wrote, "equal": torch.equal(out, ref),
                 "tied": model.head.weight is model.embed.weight, "device": str(model.packed.device)})
    barrier.wait()                          # the exporter outlives the importer's use


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_two_processes_share_one_copy(tmp_path):
    got = run_pair(_gpu_child, tmp_path, 120)
    assert sorted(r["wrote"] for r in got) == [False, True]
    assert all(r["equal"] and r["tied"] and r["device"] == "cuda:0" for r in got)
