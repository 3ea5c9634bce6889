"""/dev/shm full, missing or unwritable (issue 11): a KV segment is refused with a clear
SegmentError before anything is created, and the launcher refuses a deployment whose shared
memory (KV pools, shared weights, python backend stubs) does not fit, before it starts
anything. `sleep` stands in for tritonserver."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.core.config import ModelConfig
from backends.core.kv_cache import KVLayout
from deploy import server as launcher
from deploy.deployment import default_deployment
from deploy.render import render_repository
from deploy.server import ServerError, TritonServer, free_ports
from deploy.shm_space import check_shm_space, read_model_config, repository_deployment, shm_need
from deploy.server_setup import SHARED_WEIGHTS_ENV
from kvtransfer import segment
from kvtransfer.errors import SegmentError
from kvtransfer.shm import ShmKVExporter

MIB = 1 << 20
# SmolLM2-135M's dimensions (the default model), so no test here needs the model file
SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True)
BLOCK_BYTES = 30 * 2 * 3 * 16 * 64 * 2      # layers x (K, V) x heads x block x head_dim x bf16


def layout(num_blocks: int = 512, dtype: str = "bfloat16") -> KVLayout:
    return KVLayout(num_blocks, SMOLLM2.num_layers, 16, SMOLLM2.num_kv_heads, SMOLLM2.head_dim, dtype)


def fake_statvfs(monkeypatch, path: str | Path, free_bytes: int) -> None:
    """os.statvfs reports `free_bytes` free for `path` (every other path as it is)."""
    real = os.statvfs

    def statvfs(p):
        if os.fspath(p) == os.fspath(path):
            return SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)
        return real(p)
    monkeypatch.setattr(segment.os, "statvfs", statvfs)


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    """The segment module's SHM_DIR, moved to an empty private directory."""
    monkeypatch.delenv(segment.SEGMENT_LOG_ENV, raising=False)
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setattr(segment, "SHM_DIR", str(path))
    return path


# ---- Segment.create -----------------------------------------------------------------------

def test_segment_refuses_a_pool_larger_than_the_free_space_and_creates_nothing(shm_dir, monkeypatch):
    fake_statvfs(monkeypatch, shm_dir, 64 * MIB)
    with pytest.raises(SegmentError) as info:
        segment.Segment.create("shm", layout(512), "prefill-0")
    message = str(info.value)
    assert message.startswith("not enough shared memory for the KV pool of prefill-0: it needs 180.0 MiB, "
                              f"{shm_dir} has 64.0 MiB free (in Docker, start the container with "
                              "--shm-size=2g or more")
    assert list(shm_dir.iterdir()) == []


def test_segment_fits_exactly_the_free_space(shm_dir, monkeypatch):
    _, nbytes = segment.segment_geometry("shm", layout(4))
    fake_statvfs(monkeypatch, shm_dir, nbytes)
    seg = segment.Segment.create("shm", layout(4), "prefill-0")
    try:
        assert os.path.getsize(seg.path) == nbytes
    finally:
        seg.close()
    assert list(shm_dir.iterdir()) == []


def test_a_reservation_that_loses_a_race_is_a_segment_error_and_leaves_no_file(shm_dir, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(segment.os, "posix_fallocate", no_space)
    with pytest.raises(SegmentError, match=r"cannot reserve 1\.4 MiB of shared memory in .* for the KV "
                                           r"pool of prefill-0: No space left on device \(in Docker"):
        segment.Segment.create("shm", layout(4), "prefill-0")
    assert list(shm_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "regular file"])
def test_segment_without_a_shm_directory_names_it(tmp_path, monkeypatch, kind):
    path = tmp_path / "shm"
    if kind == "regular file":
        path.write_text("")
    monkeypatch.setattr(segment, "SHM_DIR", str(path))
    with pytest.raises(SegmentError, match=f"cannot create the KV pool of prefill-0: {path} does not "
                                           "exist or is not a directory"):
        segment.Segment.create("shm", layout(4), "prefill-0")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOENT])
def test_segment_in_an_unwritable_shm_directory_names_it_and_the_cause(shm_dir, monkeypatch, code):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if os.path.dirname(os.fspath(path)) == str(shm_dir):
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(segment.os, "open", refusing_open)
    with pytest.raises(SegmentError) as info:
        segment.Segment.create("shm", layout(4), "prefill-0")
    assert str(info.value) == \
        f"cannot create the KV pool of prefill-0 in {shm_dir}: {os.strerror(code)}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0500) directory")
def test_segment_in_a_read_only_directory(shm_dir):
    shm_dir.chmod(0o500)
    try:
        with pytest.raises(SegmentError, match=f"in {shm_dir}: Permission denied"):
            segment.Segment.create("shm", layout(4), "prefill-0")
    finally:
        shm_dir.chmod(0o700)


# ---- the launcher's estimate ----------------------------------------------------------------

def small(deployment, **changes):
    """`deployment` with a 4-block prefill pool (and a context that fits in it)."""
    return replace(deployment, max_model_len=64, default_max_tokens=32,
                   prefill=replace(deployment.prefill, num_kv_blocks=4), **changes)


@pytest.mark.parametrize("dtype, kv_dtype, pool_dtype", [("bfloat16", "auto", "bfloat16"),
                                                         ("float32", "auto", "float32"),
                                                         ("bfloat16", "int8", "int8")])
def test_the_kv_pool_estimate_is_what_the_exporter_occupies(dtype, kv_dtype, pool_dtype):
    deployment = small(default_deployment(num_cores=2), dtype=dtype, kv_dtype=kv_dtype)
    need = shm_need(deployment, SMOLLM2, checkpoint_nbytes=0)
    with ShmKVExporter(layout(4, pool_dtype), "prefill-0") as exporter:
        st = os.stat(os.path.join(segment.SHM_DIR, exporter.pool_name))
    assert need["KV pool of prefill-0"] == st.st_size <= st.st_blocks * 512     # reserved, not sparse


def test_the_default_deployment_needs_its_pool_its_weights_and_three_stubs():
    need = shm_need(default_deployment(num_cores=2), SMOLLM2, checkpoint_nbytes=94 * MIB)
    assert list(need) == ["KV pool of prefill-0", "shared weights (auto + bf16)",
                          "python backend (3 stubs)"]
    pool = 512 * BLOCK_BYTES
    assert pool < need["KV pool of prefill-0"] < pool + 64 * 1024      # + the lease table
    assert need["shared weights (auto + bf16)"] == 2 * 94 * MIB      # prefill dense, decode int4
    assert need["python backend (3 stubs)"] == 3 * 8 * MIB
    check_shm_space(need, free_bytes=16 << 30)                     # plenty: no error
    unshared = shm_need(replace(default_deployment(num_cores=2), share_weights=False), SMOLLM2,
                        94 * MIB)
    assert not any(item.startswith("shared weights") for item in unshared)
    assert "KV pool of prefill-0" not in shm_need(default_deployment(num_cores=2), None, 94 * MIB)


def test_the_preflight_refuses_with_the_breakdown():
    need = shm_need(default_deployment(num_cores=2), SMOLLM2, checkpoint_nbytes=94 * MIB)
    with pytest.raises(ServerError) as info:
        check_shm_space(need, free_bytes=64 * MIB)
    assert str(info.value).startswith(
        "not enough shared memory for this deployment: it needs 392.0 MiB in /dev/shm (KV pool of "
        "prefill-0 180.0 MiB, shared weights (auto + bf16) 188.0 MiB, python backend (3 stubs) 24.0 MiB), "
        "/dev/shm has 64.0 MiB free (in Docker, start the container with --shm-size=2g or more")
    check_shm_space(need, free_bytes=sum(need.values()))           # exactly enough


def test_the_model_dimensions_come_from_the_checkpoint(tmp_path, gguf_path):
    config = read_model_config(gguf_path)
    assert (config.num_layers, config.num_kv_heads, config.head_dim) == (30, 3, 64)
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert read_model_config(tmp_path / "empty.gguf") is None      # its instances report it


# ---- the launcher: refuses before it starts anything --------------------------------------------

def hf_model_dir(path: Path, weights_nbytes: int = 0) -> Path:
    """A HF directory with SmolLM2's config.json and a sparse `weights_nbytes` safetensors file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights_nbytes)
    return path


def sleeping_server(tmp_path, monkeypatch, deployment) -> TritonServer:
    monkeypatch.delenv(SHARED_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(TritonServer, "command", lambda self, backend_dir: ["sleep", "60"])
    repo = render_repository(deployment, tmp_path / "repo")
    assert repository_deployment(repo) == deployment
    ports = free_ports(3)
    return TritonServer(repo, run_dir=tmp_path / "run", http_port=ports[0], grpc_port=ports[1],
                        metrics_port=ports[2])


def test_start_refuses_a_full_shm_and_leaves_nothing(tmp_path, monkeypatch):
    deployment = default_deployment(num_cores=2).with_model_path(hf_model_dir(tmp_path / "model"))
    server = sleeping_server(tmp_path, monkeypatch, deployment)
    fake_statvfs(monkeypatch, "/dev/shm", 64 * MIB)
    with pytest.raises(ServerError, match=r"it needs 204\.0 MiB in /dev/shm \(KV pool of prefill-0 "
                                          r"180\.0 MiB, python backend \(3 stubs\) 24\.0 MiB\), "
                                          r"/dev/shm has 64\.0 MiB free"):
        server.start()
    assert server.process is None and server.control_dir is None and server.shared_weights_dir is None
    assert not server.run_dir.exists()


@pytest.mark.parametrize("kind", ["missing", "regular file"])
def test_start_without_shm_names_it(tmp_path, monkeypatch, kind):
    server = sleeping_server(tmp_path, monkeypatch, default_deployment(num_cores=2))
    path = tmp_path / "shm"
    if kind == "regular file":
        path.write_text("")
    monkeypatch.setattr(launcher, "SHM_DIR", str(path))
    with pytest.raises(ServerError, match=f"{path} does not exist or is not a directory"):
        server.start()
    assert server.process is None and not server.run_dir.exists()


def test_start_refuses_an_unwritable_shm(tmp_path, monkeypatch):
    server = sleeping_server(tmp_path, monkeypatch, default_deployment(num_cores=2))

    def read_only(*args, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(launcher.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ServerError, match=r"/dev/shm is not writable \(Read-only file system\)"):
        server.start()
    assert server.process is None


@pytest.mark.parametrize("free_gib, weights_in_shm", [(16, True), (1.5, False)])
def test_shared_weights_go_to_shm_only_if_everything_fits(tmp_path, monkeypatch, free_gib,
                                                          weights_in_shm):
    model = hf_model_dir(tmp_path / "model", weights_nbytes=1 << 30)    # two copies: 2 GiB
    deployment = default_deployment(num_cores=2).with_model_path(model)
    server = sleeping_server(tmp_path, monkeypatch, deployment)
    fake_statvfs(monkeypatch, "/dev/shm", int(free_gib * (1 << 30)))
    server.start()
    try:
        parent = str(server.shared_weights_dir.parent)
        assert parent == ("/dev/shm" if weights_in_shm else tempfile.gettempdir())
    finally:
        server.stop(timeout=5)
    assert not server.shared_weights_dir.exists()
