"""Launch the tritonserver shipped in the nvidia-pytriton wheel, on loopback by default.

Lifecycle: `start()` prepares a backend directory (the wheel's python backend plus the stub
built for this interpreter's Python version), starts `tritonserver` in its own session with
stdout/stderr going to a log file; `wait_ready()` polls `v2/health/ready`; `stop()` sends
SIGTERM to the whole process group (server and python backend stubs), escalates to SIGKILL
after a timeout and checks that no process of the group survived. `stop()` is idempotent and
the context manager does start + wait_ready / stop. Each run gets private directories, passed
to the instances in the environment and removed by stop() (or by a failed start()): control
sockets ($DISTSERVE_RUN_DIR) and the one shared copy of the weights
($DISTSERVE_SHARED_WEIGHTS_DIR, under /dev/shm when it has room).

The wheel's paths, the backend directory, the environment, port checks and the shared-weights
directory come from deploy.server_setup (free_ports and make_shared_weights_dir re-exported here).

Before it starts anything, `start()` checks /dev/shm (`shm_need`, `check_shm_space`): it must
be a writable directory with room for the deployment's prefill KV pools, its shared weights (if
they go there) and the python backend stubs' regions; otherwise one ServerError says what is
needed, item by item, and what is free. The shared weights go to /dev/shm only if all of it fits.
"""
from __future__ import annotations

import ctypes
import http.client
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

from deploy.process_group import alive, group_members, reap, signal_group
from deploy.render import FRONT_ENDS
from deploy.server_setup import (CONTROL_DIR_PREFIX, ROOT, SHARED_WEIGHTS_ENV, SHM_MIN_FREE_BYTES,
                                 WEIGHTS_DIR_PREFIX, ServerError, check_ports_free,
                                 make_private_dir, prepare_backend_dir, server_env,
                                 shared_weights_parent, sweep_orphans, triton_dist_dir)
from deploy.server_setup import free_ports, make_shared_weights_dir  # noqa: F401 (re-export)
from deploy.shm_space import (SHM_DIR, WEIGHTS_ITEM, check_shm_space, checkpoint_nbytes,
                              read_model_config, repository_deployment, shm_free_bytes, shm_need,
                              stub_shm_bytes)
from deploy.supervisor import Supervisor, reload_model, requests_in_flight

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_ERROR_LINE = re.compile(r"^E\d{4} ")
_HARMLESS = ("CudaDriverHelper has not been initialized",)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never a proxy


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)


def crashed(returncode: int | None) -> bool:
    """Whether a tritonserver exit code is a crash (killed by a fault signal), as opposed to
    still running (None), an exit of its own, or a SIGTERM / SIGKILL someone sent it."""
    return returncode is not None and returncode < 0 and -returncode in CRASH_SIGNALS


# Triton's python backend aborts the whole server when a stub dies holding one of the mutexes
# of their shared memory: the server's next lock of it finds the owner dead and throws this,
# uncaught (docs/faults.md). Nothing in our code can prevent it; the supervisor restarts.
IPC_MUTEX_ABORT = "boost::interprocess::lock_exception"


def crash_cause(log_text: str) -> str | None:
    """Why the tritonserver that wrote this log crashed: IPC_MUTEX_ABORT (the python backend's
    abort on a stub killed holding its IPC mutex), else its "Signal (N) received." line for a
    fault signal (CRASH_SIGNALS), else None. Triton prints the same line for the SIGTERM of an
    ordinary stop, which is no crash."""
    if IPC_MUTEX_ABORT in log_text:
        return IPC_MUTEX_ABORT
    faults = tuple(f"Signal ({int(s)})" for s in CRASH_SIGNALS)
    return next((line.strip() for line in log_text.splitlines() if line.startswith(faults)), None)


class TritonServer:
    """One tritonserver process serving `model_repository`.

    Args:
        model_repository: directory with `<model>/config.pbtxt` and `<model>/<version>/`.
        run_dir: where the backend directory and `server.log` go (default: a new temp dir).
        host: address all three endpoints bind to (127.0.0.1 unless told otherwise).
        http_port, grpc_port, metrics_port: endpoint ports.
        log_verbose: tritonserver --log-verbose level.
        exit_timeout_s: how long the server waits, on SIGTERM, for in-flight requests and open
            HTTP/gRPC connections (a client's keep-alive connection counts) before it unloads.
        extra_args: more tritonserver flags, appended last.
        env: extra environment variables for the server and the stubs.
        die_with_parent: the server gets SIGTERM when the thread that started it ends (Linux
            PDEATHSIG, as pytriton does), so a crashed test run leaves no server behind. Turn
            it off when starting from a short-lived thread.
        share_weights: give the instances a fresh private directory ($DISTSERVE_SHARED_WEIGHTS_DIR)
            where those of one deployment map one copy of the weights; removed by stop(). An
            instance shares only if its deployment's `share_weights` is true as well.
    """

    def __init__(self, model_repository: str | Path, *, run_dir: str | Path | None = None,
                 host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_verbose: int = 0, exit_timeout_s: int = 10,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 die_with_parent: bool = True, share_weights: bool = True) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent
        self.share_weights = share_weights
        self.supervisor: Supervisor | None = None        # started once ready
        self.restarts: list[float] = []                  # seconds each automatic restart took
        self._lock = threading.Lock()                    # a restart against stop()
        self._stopping = threading.Event()
        self._restarting = threading.Event()
        self.log_file = self.run_dir / "server.log"
        # /dev/shm/<prefix>*: the python backend's regions (and kvtransfer's, if it uses the
        # prefix); unique, so two servers never clash
        self.shm_prefix = f"distserve{os.getpid()}_{secrets.token_hex(3)}_"
        self.process: subprocess.Popen | None = None
        self.control_dir: Path | None = None
        self.shared_weights_dir: Path | None = None

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        return [
            str(triton_dist_dir() / "bin" / "tritonserver"),
            "--model-repository", str(self.model_repository),
            "--backend-directory", str(backend_dir),
            "--cache-directory", str(triton_dist_dir() / "caches"),
            "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false",
            "--log-verbose", str(self.log_verbose),
            "--exit-timeout-secs", str(self.exit_timeout_s),
            # explicit model control: the orchestrator reloads a model whose instance died
            "--model-control-mode=explicit", "--load-model=*",
            # the configs are rendered complete: no auto-complete stub per model (each one
            # a python process importing the adapter, hence torch) at every load and reload
            "--disable-auto-complete-config",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            raise ServerError(f"server already running (pid {self.process.pid})")
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist")
        check_ports_free(self.host, [self.http_port, self.grpc_port, self.metrics_port])
        for parent, prefix in ((SHM_DIR, WEIGHTS_DIR_PREFIX), (tempfile.gettempdir(), WEIGHTS_DIR_PREFIX),
                               (tempfile.gettempdir(), CONTROL_DIR_PREFIX)):
            for path in sweep_orphans(parent, prefix):       # an earlier launcher killed
                log.warning("removed %s, left by a server launcher that is gone", path)
        weights_parent = self._check_shm()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = prepare_backend_dir(self.run_dir / "backends")
        try:
            env = server_env() | self._private_env(weights_parent) | self.extra_env
            with open(self.log_file, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(backend_dir), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                    preexec_fn=_die_with_parent if self.die_with_parent else None)
        except BaseException:
            self._remove_private_dirs()
            raise
        return self

    def _check_shm(self) -> str:
        """ServerError unless /dev/shm can hold what this server's deployment puts there (its
        models' configs carry it; a repository without one is only checked for a writable
        /dev/shm). Returns where the shared weights go: /dev/shm only if all of it fits."""
        free = shm_free_bytes(SHM_DIR)
        deployment = repository_deployment(self.model_repository)
        if deployment is None:
            return shared_weights_parent()
        model = deployment.resolved_model_path()
        need = shm_need(deployment, read_model_config(model), checkpoint_nbytes(model),
                        stub_shm_bytes(self.extra_args))
        parent = shared_weights_parent(max(SHM_MIN_FREE_BYTES, sum(need.values())))
        caller_dir = os.environ.get(SHARED_WEIGHTS_ENV) or self.extra_env.get(SHARED_WEIGHTS_ENV)
        weights_in_shm = Path(caller_dir).resolve().is_relative_to(SHM_DIR) if caller_dir \
            else self.share_weights and parent == SHM_DIR
        if not weights_in_shm:
            need = {item: n for item, n in need.items() if not item.startswith(WEIGHTS_ITEM)}
        check_shm_space(need, free)
        return parent

    def _private_env(self, weights_parent: str) -> dict[str, str]:
        """Per-server names: a private (0700, short-path) directory for the instances' control
        sockets, removed by stop(); the same for the shared weights (if share_weights); and
        the shm prefix, which kvtransfer may use so that stop() sweeps its segments too after
        a hard kill. A directory the caller names in the environment is theirs to remove."""
        env = {"DISTSERVE_SHM_PREFIX": self.shm_prefix,
               "DISTSERVE_SERVER_URL": self.http_url}         # for the orchestrator's reloads
        if self._unset("DISTSERVE_RUN_DIR"):
            self.control_dir = make_private_dir(CONTROL_DIR_PREFIX)
            env["DISTSERVE_RUN_DIR"] = str(self.control_dir)
            env["DISTSERVE_SEGMENT_LOG"] = str(self.control_dir / "kv-segments")
        if self.share_weights and self._unset(SHARED_WEIGHTS_ENV):
            self.shared_weights_dir = make_private_dir(WEIGHTS_DIR_PREFIX, weights_parent)
            env[SHARED_WEIGHTS_ENV] = str(self.shared_weights_dir)
        return env

    def _unset(self, name: str) -> bool:
        return name not in os.environ and name not in self.extra_env

    def _remove_private_dirs(self) -> None:
        for path in (self.control_dir, self.shared_weights_dir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_restarting(self) -> bool:
        return self._restarting.is_set()

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with _NO_PROXY.open(url, timeout=2) as response:
                return response.status == 200
        except (OSError, http.client.HTTPException):       # URLError and HTTPError are OSErrors
            return False

    def wait_ready(self, timeout: float = 120.0) -> TritonServer:
        """Poll until ready; raise ServerError (with the log's tail) on timeout or early exit."""
        if self.process is None:
            raise ServerError("server not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise ServerError(self._failure(f"exited early with code {self.process.returncode}"))
            if self.is_ready():
                self._supervise()
                return self
            time.sleep(0.2)
        raise ServerError(self._failure(f"not ready after {timeout:.0f}s"))

    def _supervise(self) -> None:
        """Watch the front-end models' stubs (deploy/supervisor.py): nothing inside the server
        watches the orchestrator, whose stub was once seen to crash."""
        models = [m for m in FRONT_ENDS if (self.model_repository / m).is_dir()]
        if self.supervisor is None and models:
            self.supervisor = Supervisor(self.process.pid, models, self.recover_front_end)
            self.supervisor.check()                     # the stubs there now
            self.supervisor.start()

    def recover_front_end(self, model: str) -> None:
        """The stub of front end `model` died. With nothing in flight on it, reload the model.
        With requests in flight, restart the whole server: Triton never ends the streams a dead
        python stub held (their clients wait until they give up), and after a reload the new
        stub's responses were seen never to reach their clients (docs/faults.md). Killing the
        server ends those streams at once (the clients see the connection drop)."""
        if not self._stopping.is_set() and crashed(self.process.poll()):
            # tritonserver itself crashed (seen: SIGABRT from the python backend when a stub
            # was killed holding its IPC mutex, docs/faults.md): serve again
            self.restart(f"tritonserver crashed (exit code {self.process.poll()}); the {model} "
                         "stub went with it")
            return
        if self._stopping.is_set() or not self.is_alive() or not self.is_ready():
            # the server itself is going (a SIGTERM or SIGKILL from elsewhere): its stubs end
            # with it, and that is no front-end death to recover from
            print(f"tritonserver is not serving (exit code {self.process.poll()}): the {model} "
                  "stub went with it; not restarting", flush=True)
            return
        in_flight = requests_in_flight(self.metrics_url, model)
        if in_flight == 0:
            self.reload_model(model)
        else:
            self.restart(f"the {model} stub died with {in_flight} requests in flight")

    def restart(self, why: str, timeout: float = 300.0) -> None:
        """SIGKILL the server's process group, sweep what it left (shm regions, KV pools,
        private directories), start it again on the same ports and wait until it is ready.
        Called from the supervisor's thread; stop() waits for it, and it gives up at once
        once stop() has begun. ServerError if the new server does not come up."""
        with self._lock:
            if self._stopping.is_set() or self.process is None:
                return
            t0 = time.monotonic()
            self._restarting.set()
            try:
                signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
                self._stop_group(timeout=10)
                self._remove_private_dirs()
                self.control_dir = self.shared_weights_dir = None
                print(f"tritonserver restarted: {why} (the old log: {self._keep_log()})", flush=True)
                self.start()
                deadline = time.monotonic() + timeout
                while not self.is_ready():
                    if self._stopping.is_set():
                        return
                    if not self.is_alive() or time.monotonic() > deadline:
                        raise ServerError(self._failure("did not come back after a restart"))
                    time.sleep(0.2)
                if self.supervisor is not None:
                    self.supervisor.rebase(self.process.pid)
                self.restarts.append(time.monotonic() - t0)
            finally:
                self._restarting.clear()

    @property
    def kept_log(self) -> Path:
        """Where a restart keeps the log of the server that died (how it died is in it)."""
        return self.log_file.with_name(self.log_file.name + ".before-restart")

    def restart_cause(self) -> str | None:
        """crash_cause() of the server the last restart replaced; None if none was restarted."""
        if not self.restarts or not self.kept_log.exists():
            return None
        return crash_cause(self.kept_log.read_text(errors="replace"))

    def _keep_log(self) -> Path:
        kept = self.kept_log
        if self.log_file.exists():
            self.log_file.replace(kept)
        return kept

    def reload_model(self, model: str) -> None:
        """Unload and load `model` (explicit model control); ServerError if Triton refuses."""
        try:
            reload_model(self.http_url, model)
        except RuntimeError as e:
            raise ServerError(str(e)) from None

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=num_lines))
        except FileNotFoundError:
            return "(no log)"

    def error_lines(self, limit: int = 20) -> list[str]:
        """Triton's error lines (`E<mmdd> ...`), minus the harmless ones of a CPU-only host."""
        try:
            with open(self.log_file, errors="replace") as f:
                lines = [line.rstrip("\n") for line in f if _ERROR_LINE.match(line)]
        except FileNotFoundError:
            return []
        return [line for line in lines if not any(h in line for h in _HARMLESS)][:limit]

    def _failure(self, what: str) -> str:
        errors = "\n".join(self.error_lines()) or "(none)"
        return (f"tritonserver {what}; log: {self.log_file}\n--- error lines ---\n{errors}\n"
                f"--- last lines ---\n{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`; return the exit code.

        `timeout` defaults to exit_timeout_s + 30 (time to unload the models). After a SIGKILL
        the python backend's /dev/shm regions (our unique prefix) are removed here.
        Raises ServerError if a process of the group (e.g. a python backend stub) survives.
        """
        timeout = self.exit_timeout_s + 30 if timeout is None else timeout
        self._stopping.set()                        # a restart under way gives up
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        with self._lock:
            try:
                if self.process is None:
                    self._remove_private_dirs()
                    return None
                try:
                    self._stop_group(timeout)
                finally:
                    self._remove_private_dirs()
                return self.process.returncode
            finally:
                self._stopping.clear()

    def _stop_group(self, timeout: float) -> None:
        pgid = self.process.pid             # start_new_session: the server leads its group
        members = group_members(pgid, self.shm_prefix)
        if self.process.poll() is None:
            signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_group(pgid, signal.SIGKILL)
                self.process.wait(10)
        reap(members + group_members(pgid, self.shm_prefix), pgid, timeout=10)
        leftovers = [p.pid for p in group_members(pgid, self.shm_prefix)] + \
            [p.pid for p in members if alive(p)]
        if leftovers:
            raise ServerError(f"processes of tritonserver pid {pgid} survived stop(): "
                              f"{sorted(set(leftovers))}")
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            region.unlink(missing_ok=True)
        self._remove_kv_segments()

    def _remove_kv_segments(self) -> None:
        """The KV pools this server's instances created (kvtransfer logs each name): a killed
        instance never unlinked its own."""
        log = self.control_dir / "kv-segments" if self.control_dir else None
        if log is None or not log.exists():
            return
        for name in log.read_text().split():
            if re.fullmatch(r"distserve-kv-\d{1,10}-[0-9a-f]{16}", name):   # kvtransfer's names
                Path("/dev/shm", name).unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
