"""deploy/server.py and deploy/server_setup.py: the launcher's pieces (backend directory,
environment, command, ports, stop before start) and a server run's private shared-weights
directory, with `sleep` standing in for tritonserver (tests/integration/ runs the real one)."""
from __future__ import annotations

import socket
import stat
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from deploy.server import TritonServer
from deploy.server_setup import (SHARED_WEIGHTS_ENV, ServerError, check_ports_free, free_ports,
                                 prepare_backend_dir, server_env, shared_weights_parent)


def test_backend_dir_has_the_stub_for_this_python(tmp_path):
    python_dir = prepare_backend_dir(tmp_path) / "python"
    assert {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"} \
        <= {p.name for p in python_dir.iterdir()}


def test_server_env_paths():
    env = server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    libs = env["LD_LIBRARY_PATH"].split(":")
    assert libs[0] == sysconfig.get_config_var("LIBDIR")
    assert Path(libs[0], sysconfig.get_config_var("INSTSONAME")).exists()     # libpython3.X.so.1.0
    assert libs[1].endswith("nvidia_pytriton.libs") and libs[-1] == "/opt/lib"


def test_command_binds_loopback_by_default(tmp_path):
    args = TritonServer(tmp_path).command(tmp_path / "backends")
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert args[args.index(flag) + 1] == "127.0.0.1"
    assert args[args.index("--allow-metrics") + 1] == "true"


def test_ports(tmp_path):
    ports = free_ports(3)
    assert len(set(ports)) == 3
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {busy} on 127.0.0.1 is in use"):
            TritonServer(tmp_path, http_port=ports[0], grpc_port=busy, metrics_port=ports[2]).start()
    check_ports_free("127.0.0.1", ports)


def test_stop_before_start_is_a_no_op(tmp_path):
    server = TritonServer(tmp_path)
    assert server.stop() is None and server.stop() is None
    with pytest.raises(ServerError, match="not started"):
        server.wait_ready(1)



def _sleeping_server(tmp_path, monkeypatch, **kw) -> TritonServer:
    """A TritonServer whose 'tritonserver' is `sleep 60`: the launcher's lifecycle, no Triton."""
    monkeypatch.delenv(SHARED_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(TritonServer, "command", lambda self, backend_dir: ["sleep", "60"])
    ports = free_ports(3)
    return TritonServer(tmp_path / "repo", run_dir=tmp_path / "run", http_port=ports[0],
                        grpc_port=ports[1], metrics_port=ports[2], **kw)


def test_server_run_owns_a_private_shared_weights_dir(tmp_path, monkeypatch):
    from backends.core.weight_share import ENV_VAR
    assert SHARED_WEIGHTS_ENV == ENV_VAR
    (tmp_path / "repo").mkdir()
    server = _sleeping_server(tmp_path, monkeypatch).start()
    try:
        env = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
        prefix = SHARED_WEIGHTS_ENV.encode() + b"="
        assert [e[len(prefix):].decode() for e in env if e.startswith(prefix)] == [str(server.shared_weights_dir)]
        assert server.shared_weights_dir.name.startswith("distserve-weights-")
        assert stat.S_IMODE(server.shared_weights_dir.stat().st_mode) == 0o700
    finally:
        server.stop(timeout=5)
    assert not server.shared_weights_dir.exists() and not server.control_dir.exists()
    assert shared_weights_parent(min_free_bytes=1 << 62) == tempfile.gettempdir()


def test_server_share_weights_off_and_failed_start_leave_no_dir(tmp_path, monkeypatch):
    (tmp_path / "repo").mkdir()
    server = _sleeping_server(tmp_path, monkeypatch, share_weights=False).start()
    server.stop(timeout=5)
    assert server.shared_weights_dir is None
    made = []

    def failing_popen(*args, env, **kw):
        made.append(Path(env[SHARED_WEIGHTS_ENV]))
        assert made[0].is_dir()
        raise OSError("no tritonserver")
    monkeypatch.setattr("deploy.server.subprocess.Popen", failing_popen)
    with pytest.raises(OSError, match="no tritonserver"):
        _sleeping_server(tmp_path, monkeypatch).start()
    assert made and not made[0].exists()


def test_directories_of_a_launcher_that_died_are_swept(tmp_path):
    """A launcher killed by a signal never runs stop(): its private directories (named with its
    pid) stay. sweep_orphans (run by every start) removes those whose pid is gone, and leaves
    a live process's, our own, a look-alike file, a symlink and other names alone."""
    import os
    import subprocess
    from deploy.server_setup import WEIGHTS_DIR_PREFIX, make_private_dir, sweep_orphans
    code = ("import sys; sys.path.insert(0, %r); from deploy.server_setup import make_private_dir; "
            "print(make_private_dir('distserve-weights-', %r))" % (str(Path.cwd()), str(tmp_path)))
    dead = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.strip())
    (dead / "weights.bin").write_bytes(b"x" * 1024)
    assert dead.is_dir() and dead.name.startswith(f"{WEIGHTS_DIR_PREFIX}")
    ours = make_private_dir(WEIGHTS_DIR_PREFIX, str(tmp_path))
    alive = tmp_path / f"{WEIGHTS_DIR_PREFIX}1-abc"                   # pid 1: alive
    alive.mkdir()
    pid_of_dead = int(dead.name[len(WEIGHTS_DIR_PREFIX):].split("-")[0])
    file_alike = tmp_path / f"{WEIGHTS_DIR_PREFIX}{pid_of_dead}-file"
    file_alike.write_text("not a directory")
    link = tmp_path / f"{WEIGHTS_DIR_PREFIX}{pid_of_dead}-link"
    link.symlink_to(ours)
    other = tmp_path / f"other-{pid_of_dead}-x"
    other.mkdir()
    assert sweep_orphans(tmp_path, WEIGHTS_DIR_PREFIX) == [dead]
    assert not dead.exists()
    assert all(p.exists() for p in (ours, alive, file_alike, link, other))
    assert stat.S_IMODE(os.stat(ours).st_mode) == 0o700
    assert sweep_orphans(tmp_path / "missing", WEIGHTS_DIR_PREFIX) == []


def test_only_a_fault_signal_is_a_crash():
    import signal
    from deploy.server import crashed
    assert crashed(-signal.SIGABRT) and crashed(-signal.SIGSEGV) and crashed(-signal.SIGBUS)
    assert not crashed(None)                                    # still running
    assert not crashed(0) and not crashed(1)                    # its own exit (SIGTERM: 0)
    assert not crashed(-signal.SIGTERM) and not crashed(-signal.SIGKILL)   # someone stopped it
