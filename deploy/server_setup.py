"""What a tritonserver run needs before it starts (deploy.server launches it): the
nvidia-pytriton wheel's paths, the python backend directory, the server's environment, port
checks, and the directory for the one shared copy of the weights.

The environment follows pytriton's own launcher (pytriton/server/triton_server.py), plus the
base interpreter's libpython directory on LD_LIBRARY_PATH: without it the stub binds the
system libpython and e.g. `multiprocessing.shared_memory` breaks.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import stat
import sys
import sysconfig
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# Where the instances map their one shared copy of the weights (backends.core.weight_share.ENV_VAR)
SHARED_WEIGHTS_ENV = "DISTSERVE_SHARED_WEIGHTS_DIR"
SHM_MIN_FREE_BYTES = 1 << 30        # /dev/shm holds the weights only with this much room


class ServerError(RuntimeError):
    """The server failed to start, exited early, or did not become ready."""


def triton_dist_dir() -> Path:
    """pytriton/tritonserver/ of the nvidia-pytriton wheel (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed (it ships tritonserver)")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "tritonserver"


def triton_libs_dir() -> Path:
    return triton_dist_dir().parent.parent / "nvidia_pytriton.libs"


def python_lib_dir() -> Path:
    """Directory of the libpython that this interpreter (the venv's base python) uses."""
    return Path(sysconfig.get_config_var("LIBDIR"))


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that were free on `host` a moment ago (bind to port 0, then close)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_ports_free(host: str, ports: list[int]) -> None:
    """Raise ServerError naming the first port on `host` that something else holds."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ServerError(f"port {port} on {host} is in use ({exc.strerror}); is another "
                                  f"server running?") from None


def prepare_backend_dir(dest: Path) -> Path:
    """Write `dest/python/` = the wheel's python backend + the stub for this Python version.

    Returns `dest`, to pass as `--backend-directory`.
    """
    dist = triton_dist_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the nvidia-pytriton wheel has no python backend stub for Python "
                          f"{version} ({stub})")
    python_dir = Path(dest) / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (dist / "backends" / "python").iterdir():
        if src.is_file():
            shutil.copy2(src, python_dir / src.name)
    shutil.copy2(stub, python_dir / stub.name)
    return Path(dest)


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its python backend stubs."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
    libs = [str(python_lib_dir()), str(triton_libs_dir()), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    # The stubs run Python with -E (PYTHONPATH ignored) and with "" (the cwd) on sys.path:
    # the server runs in the repo root so adapters can import backends, kvtransfer, deploy.
    # PYTHONPATH still serves any plain Python child.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("DISTSERVE_ROOT", str(ROOT))
    return env


def shared_weights_parent(min_free_bytes: int = SHM_MIN_FREE_BYTES) -> str:
    """/dev/shm if it is a writable directory with `min_free_bytes` free (Docker's default is
    64 MiB), else the system temp dir (the page cache shares a disk file's pages just as well)."""
    shm = "/dev/shm"
    try:
        vfs = os.statvfs(shm)
        if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) \
                and vfs.f_bavail * vfs.f_frsize >= min_free_bytes:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


WEIGHTS_DIR_PREFIX = "distserve-weights-"
CONTROL_DIR_PREFIX = "distserve-ctl-"


def make_private_dir(prefix: str, parent: str | None = None) -> Path:
    """A fresh private (0700) directory `<parent>/<prefix><our pid>-<random>`: the pid lets a
    later run tell a directory whose creator died without removing it (`sweep_orphans`)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def make_shared_weights_dir() -> Path:
    """A fresh private (0700) directory for one server run's shared weights."""
    return make_private_dir(WEIGHTS_DIR_PREFIX, shared_weights_parent())


def sweep_orphans(parent: str | Path, prefix: str) -> list[Path]:
    """Remove `<parent>/<prefix><pid>-*` directories of ours whose creating process is gone:
    a server's launcher killed by a signal never ran stop(), and its tritonserver (which dies
    with it) does not know these (e.g. 160 MiB of shared weights left in /dev/shm). Only real
    directories owned by this uid are touched; a pid that is alive (or reused) keeps its own."""
    removed = []
    pattern = re.compile(re.escape(prefix) + r"(\d{1,10})-[A-Za-z0-9_]+")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or psutil.pid_exists(int(m.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed
