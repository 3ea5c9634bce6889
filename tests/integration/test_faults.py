"""Faults on the real server: a killed decode or prefill instance, a stopped decode instance, a
killed decode instance of two (the other serves meanwhile).

Every in-flight request must end within a deadline, with its tokens or an error; afterwards the
server serves a normal request again (a dead instance is reloaded), no KV is left held, and
(at the end) no shared-memory segment is left."""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.fault_tools import RECOVER_S, kv_segments, segments, serves_again, settled, stub_pid
from client import DistServeClient, DistServeError
from deploy.deployment import default_deployment
from deploy.render import render_repository
from tests.integration.conftest import instance_stats, start_server, wait_kv_free

DEADLINE_S = 10.0                   # a request waiting on a dead instance ends within this


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf_path):
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     lease_timeout_s=5.0, max_model_len=1024, default_max_tokens=32)
    repo = render_repository(deployment, tmp_path_factory.mktemp("repo") / "model_repository",
                             require_code=True)
    kv_before = kv_segments()
    with start_server(repo, run_dir=tmp_path_factory.mktemp("run")) as srv:
        prefix = srv.shm_prefix
        yield srv
    assert not segments(prefix), "shared-memory segments left after the server stopped"
    assert not kv_segments() - kv_before, "KV pools of killed instances left after the server stopped"


class Streams:
    """n streaming requests on threads; each records (end time, tokens, error)."""

    def __init__(self, server, n: int, prompt: str, max_tokens: int) -> None:
        self.client = DistServeClient(server.grpc_url, "grpc", timeout=60)
        self.first = threading.Semaphore(0)
        self.results: list[tuple[float, int, str | None]] = []
        self.threads = [threading.Thread(target=self._one, args=(prompt, max_tokens)) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, prompt: str, max_tokens: int) -> None:
        tokens, error = 0, None
        try:
            for chunk in self.client.stream(prompt, max_tokens=max_tokens, ignore_eos=True,
                                            return_token_ids=True):
                if tokens == 0:
                    self.first.release()
                tokens += len(chunk.token_ids)
        except DistServeError as e:
            error = str(e)
        self.results.append((time.monotonic(), tokens, error))
        if tokens == 0:
            self.first.release()

    def wait_first_tokens(self, n: int, timeout: float = 60.0) -> None:
        for _ in range(n):
            assert self.first.acquire(timeout=timeout), "no first token"

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a request hung"


def test_killed_decode_fails_its_streams_at_once_and_is_reloaded(server):
    streams = Streams(server, 6, "Once upon a time", max_tokens=400)
    streams.wait_first_tokens(6)
    killed = time.monotonic()
    os.kill(stub_pid(server, "decode_0"), signal.SIGKILL)
    streams.join(DEADLINE_S + 5)
    assert len(streams.results) == 6
    for end, tokens, error in streams.results:
        assert error is not None and "decode" in error, error   # ours, or Triton's "stub not healthy"
        assert end - killed < DEADLINE_S
    deadline = time.monotonic() + 3                          # set at the end of the probe round
    while _ready_gauge(server) != 0.0:                       # no decode instance up: says so
        assert time.monotonic() < deadline, "distserve_ready stayed 1 with decode dead"
        time.sleep(0.2)
    recovered = serves_again(server, killed)
    settled(server)
    deadline = time.monotonic() + 10
    while _ready_gauge(server) != 1.0:                       # set after the next probe round
        assert time.monotonic() < deadline, "distserve_ready stayed 0 after the recovery"
        time.sleep(0.5)
    print(f"decode killed: streams failed within {max(e for e, _, _ in streams.results) - killed:.1f} s, "
          f"served again after {recovered:.1f} s")


def _gauge(server, prefix: str, label: str = "") -> float:
    import urllib.request
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(prefix) and label in line]
    assert len(values) == 1, f"no {prefix}...{label} gauge"
    return values[0]


def _wait_until(cond, since: float, what: str) -> None:
    """Poll `cond` every 0.1 s until it holds; fail with `what` once RECOVER_S have passed
    since `since` (time.monotonic)."""
    while not cond():
        assert time.monotonic() - since < RECOVER_S, what
        time.sleep(0.1)


def _ready_gauge(server) -> float:
    """distserve_ready on the metrics port (1: every phase has an instance up)."""
    return _gauge(server, "distserve_ready{")


def _instance_up(server, instance: str) -> float:
    """distserve_instance_up of one instance (1: the orchestrator counts it up)."""
    return _gauge(server, "distserve_instance_up{", f'instance="{instance}"')


def test_killed_prefill_fails_what_waits_on_it_and_is_reloaded(server):
    long = "The quick brown fox jumps over the lazy dog. " * 80       # ~800 tokens each
    streams = Streams(server, 4, long, max_tokens=8)
    time.sleep(0.5)                                                  # queued on prefill
    killed = time.monotonic()
    os.kill(stub_pid(server, "prefill_0"), signal.SIGKILL)
    streams.join(DEADLINE_S + 5)
    assert len(streams.results) == 4
    for end, tokens, error in streams.results:
        assert (error is None and tokens == 8) or "prefill" in (error or ""), error
        assert end - killed < DEADLINE_S
    assert any(error for _, _, error in streams.results)
    serves_again(server, killed)
    settled(server)


def test_stopped_decode_fails_its_streams_and_serves_after_it_resumes(server):
    streams = Streams(server, 4, "Once upon a time", max_tokens=300)
    streams.wait_first_tokens(4)
    pid = stub_pid(server, "decode_0")
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        streams.join(DEADLINE_S + 5)
        for end, _, error in streams.results:
            assert error is not None and "decode" in error and end - stopped < DEADLINE_S, error
        t0 = time.monotonic()
        with pytest.raises(DistServeError, match="decode"):          # not held behind it
            DistServeClient(server.grpc_url, "grpc", timeout=30).generate("Hi", max_tokens=4)
        assert time.monotonic() - t0 < 5.0
    finally:
        os.kill(pid, signal.SIGCONT)
    serves_again(server, time.monotonic())
    settled(server)


def test_kv_of_a_dead_prefill_instance_is_never_read(tmp_path, gguf_path):
    """Decode takes one sequence at a time, so two prefilled requests wait for admission while
    their KV sits in the prefill pool; prefill dies: those two fail (decode never reads the
    dead instance's KV), the running one finishes."""
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024, default_max_tokens=32)
    deployment = dataclasses.replace(deployment, decode=dataclasses.replace(deployment.decode, max_num_seqs=1))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        running = Streams(srv, 1, "Once upon a time", max_tokens=150)
        running.wait_first_tokens(1)
        waiting = Streams(srv, 2, "Hello there", max_tokens=20)
        waiting.wait_first_tokens(2)                             # prefilled; decode is full
        time.sleep(0.5)
        assert instance_stats(srv, "decode-0")["pending"] == 2
        assert instance_stats(srv, "decode-0")["kv_transfer_bytes"] > 0     # the running one's
        killed = time.monotonic()
        os.kill(stub_pid(srv, "prefill_0"), signal.SIGKILL)
        waiting.join(DEADLINE_S + 5)
        running.join(60)
        serves_again(srv, killed)
        if _crashed_and_restarted(srv):
            # Outside our code, rare (seen in two full suites under load): the stub died holding
            # its IPC mutex and Triton's python backend aborted the whole server, which the
            # launcher restarted. Streams end with our error (before the abort) or the lost
            # connection; none hangs, and none reads the dead instance's KV.
            for end, _, error in waiting.results:
                assert error is not None and end - killed < DEADLINE_S, error
                assert "prefill-0" in error or "cannot reach Triton" in error, error
            end, tokens, error = running.results[0]
            assert (error is None and tokens == 150) or "cannot reach Triton" in error, error
            warnings.warn("tritonserver aborted when the prefill stub was killed, and was restarted "
                          "(docs/faults.md)")
        else:
            for end, tokens, error in waiting.results:
                assert error is not None and "prefill-0" in error and end - killed < DEADLINE_S, error
                assert tokens == 1                               # the first token, from prefill
            assert running.results[0][2] is None and running.results[0][1] == 150
        wait_kv_free(srv, ("prefill-0", "decode-0"), timeout=30)


def _crashed_and_restarted(server) -> bool:
    """Whether tritonserver died by a fault signal and the launcher restarted it (its old log,
    kept beside the new one, says so)."""
    deadline = time.monotonic() + 10                 # restarts is appended just after ready
    while server.kept_log.exists() and not server.restarts and time.monotonic() < deadline:
        time.sleep(0.2)
    if not server.restarts:
        return False
    assert server.restart_cause(), \
        f"restarted without a crash in the old log:\n{server.kept_log.read_text(errors='replace')[-2000:]}"
    return True


def test_with_two_decode_instances_the_live_one_serves_while_the_dead_one_is_reloaded_alone(tmp_path, gguf_path):
    """1 prefill + 2 decode instances (each its own model; the two decode instances share core 1
    here, and their weights): SIGKILL decode-0's stub while streams run on both. Its streams
    fail at once, decode-1's finish; new requests during the reload all go to decode-1 and
    succeed; only decode_0 is reloaded, and then takes requests again; nothing is left held."""
    deployment = dataclasses.replace(default_deployment(str(gguf_path)), dtype="float32",
                                     max_model_len=1024, default_max_tokens=32)
    deployment = dataclasses.replace(deployment, decode=dataclasses.replace(
        deployment.decode, num_instances=2, devices=(deployment.decode.devices[0],) * 2))
    repo = render_repository(deployment, tmp_path / "model_repository", require_code=True)
    ids = ("prefill-0", "decode-0", "decode-1")
    with start_server(repo, run_dir=tmp_path / "run") as srv:
        pids = {i: instance_stats(srv, i)["pid"] for i in ids} | {"distserve": stub_pid(srv, "distserve")}
        streams = Streams(srv, 6, "Once upon a time", max_tokens=120)
        streams.wait_first_tokens(6)
        on = _wait_placed(srv, ("decode-0", "decode-1"), 6)
        assert on["decode-0"] and on["decode-1"], on                  # the burst spread
        assert stub_pid(srv, "decode_0") == pids["decode-0"]
        served_1 = instance_stats(srv, "decode-1")["requests_total"]
        killed = time.monotonic()
        os.kill(pids["decode-0"], signal.SIGKILL)
        first_new = serves_again(srv, killed)                         # one live decode instance

        # during the reload every new request goes to decode-1, and succeeds (checked at once:
        # on a fast host the reload may be done before decode-1's streams end). Once the monitor
        # counts decode-0 down, that is: serves_again's request may have gone to decode-1 before
        # it did, and a request placed on decode-0 before then fails ("decode-0 is dead").
        _wait_until(lambda: _instance_up(srv, "decode-0") == 0.0, killed, "decode-0 was never counted down")
        with pytest.raises(OSError):
            instance_stats(srv, "decode-0")                           # not back yet
        client = DistServeClient(srv.grpc_url, "grpc", timeout=60)
        before = instance_stats(srv, "decode-1")["requests_total"]
        with ThreadPoolExecutor(4) as pool:
            during = list(pool.map(lambda p: client.generate(p, max_tokens=6, ignore_eos=True).text,
                                   ["Hi", "Hello", "Why", "How"]))
        assert all(during)
        assert instance_stats(srv, "decode-1")["requests_total"] - before == 4
        assert before > served_1                                      # serves_again's went there too

        streams.join(60)
        failed = [(end, error) for end, _, error in streams.results if error is not None]
        assert len(failed) == on["decode-0"], streams.results
        for end, error in failed:
            assert "decode-0" in error or "decode_0" in error, error
            assert end - killed < DEADLINE_S
        assert all(tokens == 120 for _, tokens, error in streams.results if error is None)

        # decode_0 alone is reloaded, then takes requests again (it wins ties when idle)
        while True:
            try:
                stats = instance_stats(srv, "decode-0")
                if stats["pid"] != pids["decode-0"] and client.generate("Hi", max_tokens=4, ignore_eos=True).text \
                        and instance_stats(srv, "decode-0")["requests_total"] > 0:
                    break
            except OSError:
                pass
            assert time.monotonic() - killed < RECOVER_S, "decode-0 was not reloaded"
            time.sleep(0.5)
        reloaded = time.monotonic() - killed
        assert {i: instance_stats(srv, i)["pid"] for i in ("prefill-0", "decode-1")} == \
            {i: pids[i] for i in ("prefill-0", "decode-1")}
        assert stub_pid(srv, "distserve") == pids["distserve"]
        settled(srv, ids)
        print(f"2 decode instances, decode-0 killed: its {len(failed)} stream(s) failed within "
              f"{max(e for e, _ in failed) - killed:.1f} s, decode-1's {6 - len(failed)} finished; a new "
              f"request served after {first_new:.1f} s; decode-0 reloaded and serving after {reloaded:.1f} s")


def _wait_placed(server, instance_ids: tuple[str, ...], n: int, timeout: float = 10.0) -> dict[str, int]:
    """Requests running or waiting on each instance, once `n` are there in all."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {i: instance_stats(server, i) for i in instance_ids}
        on = {i: s["running"] + s["pending"] for i, s in stats.items()}
        if sum(on.values()) == n or time.monotonic() > deadline:
            return on
        time.sleep(0.05)


def test_a_killed_orchestrator_stub_is_reloaded_by_the_launcher(server):
    """Nothing inside the server watches the orchestrator (its stub crashed once in a soak):
    with nothing in flight on it, the launcher's supervisor reloads the `distserve` model, and
    the server serves again. Counted from here: an earlier test in this module may have
    recovered the server already (Triton's abort on a stub kill, docs/faults.md)."""
    reloads, restarts = len(server.supervisor.reloads), len(server.restarts)
    pid = stub_pid(server, "distserve")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    took = serves_again(server, t0)
    print(f"orchestrator killed: served again after {took:.1f} s")
    assert stub_pid(server, "distserve") != pid
    assert server.supervisor.reloads[reloads:] == ["distserve"]
    settled(server)
    assert len(server.restarts) == restarts                 # nothing was in flight: a reload


def test_orchestrator_killed_with_streams_in_flight_restarts_the_server(server):
    """Triton never ends the streams a dead python stub held. The launcher sees the dead
    stub had requests in flight (distserve_requests_in_flight) and restarts the server: every
    stream ends with an error at once, and the server serves again. Last in this module: the
    server is a new process afterwards."""
    streams = Streams(server, 4, "Once upon a time", max_tokens=400)
    streams.wait_first_tokens(4)
    restarts = len(server.restarts)                 # an earlier test may have restarted it
    old_pid, killed = server.process.pid, time.monotonic()
    os.kill(stub_pid(server, "distserve"), signal.SIGKILL)
    streams.join(DEADLINE_S + 5)
    assert len(streams.results) == 4
    for end, tokens, error in streams.results:
        assert error is not None and 0 < tokens < 400, (tokens, error)
        assert end - killed < DEADLINE_S
    recovered = serves_again(server, killed)
    assert server.process.pid != old_pid and len(server.restarts) == restarts + 1
    assert server.kept_log.stat().st_size > 0             # the dead server's log is kept, not overwritten
    settled(server)
    print(f"orchestrator killed with 4 streams in flight: they failed within "
          f"{max(e for e, _, _ in streams.results) - killed:.1f} s; restart took "
          f"{server.restarts[-1]:.1f} s; served again after {recovered:.1f} s")


def test_a_crashed_tritonserver_is_restarted(server):
    """tritonserver itself dies of a fault signal (seen: SIGABRT from the python backend when a
    stub was killed holding its IPC mutex, docs/faults.md): the supervisor notices its front
    end's stub gone with it and starts it again; it serves."""
    before, old_pid = len(server.restarts), server.process.pid
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGABRT)
    # Triton's own SIGABRT handler prints a backtrace before the process dies, and the old
    # server went on answering meanwhile: a request sent at once could succeed there (seen in
    # the suite: this test passed its request to the dying server, and the restart landed in
    # the next test). Serving again counts only once the supervisor has replaced it.
    _wait_until(lambda: server.process.pid != old_pid, killed, "tritonserver was not restarted")
    recovered = serves_again(server, killed)
    assert server.process.pid != old_pid and len(server.restarts) == before + 1
    settled(server)
    print(f"tritonserver SIGABRT: served again after {recovered:.1f} s")


def test_a_server_stopped_from_outside_is_not_restarted(server):
    """SIGTERM to tritonserver itself (an operator, a container runtime): its stubs exit with
    it, and the supervisor must not take that for a front-end death and start it again. Last
    in this module: the server is gone afterwards."""
    before = len(server.restarts)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    time.sleep(4)                                            # several supervisor polls
    assert not server.is_alive() and not server.is_restarting()
    assert len(server.restarts) == before
