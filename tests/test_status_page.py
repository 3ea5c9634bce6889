"""Instance status pages (backends/core/status_page.py) and their wiring into InstanceHost."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backends.core import status_page as sp
from backends.core.router import InstanceState
from backends.core.status_page import (FIELDS, PAGE_SIZE, InstanceStatus, StatusPageError,
                                       StatusReader, StatusWriter, status_path, to_instance_state)

ROOT = Path(__file__).resolve().parents[1]
INT_FIELDS = [name for name, code in FIELDS if code == "q" and name != "local_prefill"]


@pytest.fixture
def rundir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def page(rundir):
    with StatusWriter(status_path(rundir, "decode-0"), "decode-0", role="decode") as w:
        yield w


def distinct_values() -> dict:
    """A different value for every field (local_prefill is 0/1)."""
    return {name: (1 if name == "local_prefill" else i + 7 if code == "q" else (i + 1) * 0.125)
            for i, (name, code) in enumerate(FIELDS)}


# -- round trip --------------------------------------------------------------------------------
def test_every_field_round_trips(page):
    values = distinct_values()
    page.publish(**values)
    s = StatusReader(page.path, "decode-0").read()
    assert (s.instance_id, s.pid, s.role, s.stale, s.stale_reason) == ("decode-0", os.getpid(),
                                                                        "decode", False, "")
    for name, _ in FIELDS:
        assert getattr(s, name) == values[name], name
    assert s.local_prefill is True
    assert s.seq == 4                               # the empty page at creation, then one write
    assert 0 <= s.age_s < 1.0 and abs(s.written_at - time.monotonic()) < 1.0
    assert {f for f in InstanceStatus.__dataclass_fields__} >= {n for n, _ in FIELDS}


def test_a_publish_keeps_the_fields_it_does_not_name(page):
    page.publish(**distinct_values())
    page.publish(running=99)
    s = StatusReader(page.path).read()
    assert s.running == 99 and s.backlog_tokens == distinct_values()["backlog_tokens"]


def test_bad_fields_are_refused_and_leave_the_page_as_it_was(page):
    page.publish(running=3, last_step_s=0.5)
    with pytest.raises(TypeError, match="unknown status field 'nope'"):
        page.publish(nope=1)
    with pytest.raises(ValueError, match="status fields"):
        page.publish(running=2, free_kv_blocks=1.5)            # a float where a count goes
    page.publish(loading=1)
    s = StatusReader(page.path).read()
    assert (s.running, s.free_kv_blocks, s.last_step_s, s.loading) == (3, 0, 0.5, 1)


# -- no torn update, with the writer in another process -----------------------------------------
WRITER = """
import sys
from backends.core.status_page import StatusWriter
w = StatusWriter(sys.argv[1], "decode-0")
names = sys.argv[2].split(",")
print("ready", flush=True)
i = 0
while True:
    i += 1
    w.publish(**{n: i for n in names}, last_step_s=i * 0.5, step_ewma_s=i * 0.25)
"""


def spawn(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_torn_update_is_never_observed(rundir):
    path = status_path(rundir, "decode-0")
    proc = spawn(WRITER, str(path), ",".join(INT_FIELDS))
    try:
        reader = StatusReader(path)
        reads, seqs, last, started = 0, set(), 2, time.monotonic()
        # ~1 s; longer (up to 3 s) if a busy machine left too few writes to overlap with
        while ((elapsed := time.monotonic() - started) < 1.0
               or (len(seqs) < 10_000 and elapsed < 3.0)):
            s = reader.read()
            i = s.running
            assert [getattr(s, n) for n in INT_FIELDS] == [i] * len(INT_FIELDS), s
            assert (s.last_step_s, s.step_ewma_s) == (i * 0.5, i * 0.25), s
            assert not s.stale, s.stale_reason
            assert s.seq % 2 == 0 and s.seq >= last, (s.seq, last)     # the counter never goes back
            last = s.seq
            reads += 1
            seqs.add(s.seq)
    finally:
        proc.kill()
        proc.wait()
    print(f"{reads} reads, {len(seqs)} distinct writes seen, all consistent")
    assert len(seqs) > 100                          # the writer really was writing meanwhile


def test_a_write_that_never_ends_reads_as_stale(page):
    page.publish(running=5)
    fd = os.open(page.path, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<Q", page._seq + 1), sp.SEQ_OFFSET)   # odd: mid-write
    finally:
        os.close(fd)
    s = StatusReader(page.path).read()
    assert s.stale and "no consistent snapshot" in s.stale_reason


# -- refusals ----------------------------------------------------------------------------------
def refused(path: Path, match: str, **kw) -> None:
    with pytest.raises(StatusPageError, match=match):
        StatusReader(path, **kw).read()


def test_a_page_with_the_wrong_mode_is_refused(page):
    os.chmod(page.path, 0o644)
    refused(page.path, "mode 0644")
    reader = StatusReader(page.path)
    os.chmod(page.path, 0o600)
    assert reader.read() is not None
    os.chmod(page.path, 0o640)                      # checked on every read, not only the first
    with pytest.raises(StatusPageError, match="mode 0640"):
        reader.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the page another owner")
def test_a_page_of_another_owner_is_refused(page):
    os.chown(page.path, 65534, -1)
    refused(page.path, "owned by uid 65534")


def test_a_page_of_the_wrong_size_is_refused(page):
    os.truncate(page.path, PAGE_SIZE + 8)
    refused(page.path, f"{PAGE_SIZE + 8} bytes")


@pytest.mark.parametrize("offset, data, match", [
    (0, b"NOTSTATS", "magic"),
    (8, struct.pack("<I", 1), "version 1"),         # the layout before tokens_per_step
    (24, struct.pack("<I", 7), "role 7"),
])
def test_a_page_with_a_bad_header_is_refused(page, offset, data, match):
    fd = os.open(page.path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    refused(page.path, match)


def test_another_instances_page_is_refused(page):
    refused(page.path, "instance 'decode-0', not 'decode-1'", instance_id="decode-1")


def test_a_symlink_and_a_fifo_are_refused(page, rundir):
    link = rundir / "link.status"
    link.symlink_to(page.path)
    refused(link, "symbolic link")
    fifo = rundir / "fifo.status"
    os.mkfifo(fifo, 0o600)
    refused(fifo, "not a regular file")             # and the open did not block


def test_a_page_in_a_directory_others_can_write_is_refused(page, rundir):
    os.chmod(rundir, 0o777)
    try:
        refused(page.path, "not a private directory")
        with pytest.raises(StatusPageError, match="not a private directory"):
            StatusWriter(rundir / "decode-1.status", "decode-1")
    finally:
        os.chmod(rundir, 0o700)


def test_no_page_reads_as_none(rundir):
    assert StatusReader(rundir / "decode-9.status").read() is None


# -- staleness, restart ------------------------------------------------------------------------
KILLED = """
import sys
from backends.core.status_page import StatusWriter
w = StatusWriter(sys.argv[1], "decode-0", role="decode")
w.publish(running=41)
print("ready", flush=True)
import time; time.sleep(60)
"""


def test_a_killed_writers_page_is_stale_and_replaced_on_restart(rundir):
    path = status_path(rundir, "decode-0")
    proc = spawn(KILLED, str(path))
    reader = StatusReader(path)
    assert reader.read().running == 41 and not reader.read().stale
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = reader.read()                               # the page outlived its writer
    assert s.stale and s.stale_reason == f"writer pid {proc.pid} is gone" and s.running == 41
    with pytest.raises(ValueError, match="stale status"):
        to_instance_state(s)
    with StatusWriter(path, "decode-0", role="decode") as w:      # the instance restarts
        w.publish(running=2)
        s = reader.read()
        assert (s.pid, s.running, s.stale) == (os.getpid(), 2, False)
        assert [p.name for p in rundir.iterdir()] == [path.name]   # no temporary left


def test_an_old_or_future_timestamp_is_stale(rundir):
    now = [100.0]
    with StatusWriter(rundir / "p.status", "prefill-0", "prefill", clock=lambda: now[0]) as w:
        w.publish(backlog_tokens=3)
        reader = StatusReader(w.path, stale_after_s=2.0, clock=lambda: now[0] + 1.5)
        assert not reader.read().stale
        reader = StatusReader(w.path, stale_after_s=2.0, clock=lambda: now[0] + 2.5)
        s = reader.read()
        assert s.stale and s.stale_reason == "last written 2.5 s ago" and s.backlog_tokens == 3
        now[0] += 10                                # written after the reader's "now"
        assert reader.read().stale


# -- the file ----------------------------------------------------------------------------------
def test_the_page_is_0600_whatever_the_umask_and_removed_at_close(rundir):
    old = os.umask(0)
    try:
        w = StatusWriter(rundir / "colocated-0.status", "colocated-0")
    finally:
        os.umask(old)
    st = os.lstat(w.path)
    assert (st.st_mode & 0o777, st.st_size, st.st_uid) == (0o600, PAGE_SIZE, os.geteuid())
    w.close()
    assert not w.path.exists()
    w.close()                                       # again: nothing to do


def test_close_leaves_a_replacement_in_place(rundir):
    path = rundir / "decode-0.status"
    old = StatusWriter(path, "decode-0")
    new = StatusWriter(path, "decode-0")            # e.g. a reload while the old one lingers
    old.close()
    assert path.exists() and StatusReader(path).read().seq == new._seq
    new.close()
    assert not path.exists()


def test_whatever_is_at_the_path_is_replaced_not_followed(rundir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    path = rundir / "decode-0.status"
    path.symlink_to(victim)
    with StatusWriter(path, "decode-0"):
        assert not path.is_symlink() and victim.read_bytes() == b"keep me"
    path.write_bytes(b"junk")
    with StatusWriter(path, "decode-0"):
        assert StatusReader(path).read().instance_id == "decode-0"
    path.mkdir()
    with pytest.raises(StatusPageError, match="is a directory"):
        StatusWriter(path, "decode-0")
    assert sorted(p.name for p in rundir.iterdir()) == ["decode-0.status"]   # no temporary left


def test_bad_arguments():
    with pytest.raises(ValueError, match="role"):
        StatusWriter("/nonexistent/x.status", "x", role="mixed")
    with pytest.raises(ValueError, match="instance id"):
        StatusWriter("/nonexistent/x.status", "x" * 65)
    with pytest.raises(ValueError, match="bad instance id"):
        status_path(Path("/tmp"), "../x")


# -- cost --------------------------------------------------------------------------------------
def test_publish_and_read_cost(page, capsys):
    fields = {name: value for name, value in distinct_values().items()
              if name not in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                              "local_prefill")}                 # what the host sends per step
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        page.publish(**fields)
    publish_us = (time.perf_counter() - started) / n * 1e6
    reader = StatusReader(page.path)
    started = time.perf_counter()
    for _ in range(n // 4):
        reader.read()
    read_us = (time.perf_counter() - started) / (n // 4) * 1e6
    with capsys.disabled():
        print(f"\nstatus page: publish ({len(fields)} fields) {publish_us:.2f} us, "
              f"read {read_us:.2f} us")
    assert publish_us < 50


# -- the router's view -------------------------------------------------------------------------
def status(**kw) -> InstanceStatus:
    base = dict(instance_id="decode-0", pid=1, role="decode", seq=2, written_at=0.0, age_s=0.0,
                stale=False, stale_reason="", **{name: 0 for name, _ in FIELDS})
    base.update(block_size=16, max_num_seqs=8, max_num_batched_tokens=512, local_prefill=False,
                last_step_s=0.0, step_ewma_s=0.0, prefill_rate=0.0, tokens_per_step=0.0)
    return InstanceStatus(**{**base, **kw})


def test_to_instance_state():
    d = to_instance_state(status(running=3, pending=2, loading=1, running_context=300,
                                 free_kv_blocks=40, step_ewma_s=0.03, local_prefill=True,
                                 backlog_tokens=64, queued_requests=1))
    assert d == InstanceState("decode-0", "decode", 40, 64, 1, 5, 300, 16, 8, 512, True, 0.03)
    p = to_instance_state(status(instance_id="prefill-0", role="prefill", backlog_tokens=900,
                                 queued_requests=3, free_kv_blocks=7, step_ewma_s=0.2,
                                 local_prefill=True))
    assert p == InstanceState("prefill-0", "prefill", 7, 900, 3, 0, 0, 16, 8, 512, False, None)
    c = to_instance_state(status(instance_id="colocated-0", role="both", local_prefill=True))
    assert (c.phase, c.local_prefill, c.recent_step_s) == ("decode", True, None)
    assert to_instance_state(status(role="both"), phase="prefill").phase == "prefill"
    assert to_instance_state(status(tokens_per_step=2.5)).tokens_per_step == 2.5   # speculation
    assert to_instance_state(status(role="prefill", tokens_per_step=2.5)).tokens_per_step == 1.0
    assert to_instance_state(status(tpot_slack_s=0.25)).step_slack_s == 0.25      # adaptive
    assert to_instance_state(status(role="prefill", tpot_slack_s=0.25)).step_slack_s == 0.0
    # a prefill instance's measured rate reaches the router (0: not measured yet)
    assert to_instance_state(status(role="prefill", prefill_rate=900.0)).prefill_rate == 900.0
    assert to_instance_state(status(role="prefill")).prefill_rate is None
    assert to_instance_state(status(prefill_rate=900.0)).prefill_rate is None


# -- the host publishes ------------------------------------------------------------------------
def test_the_host_publishes_its_workers_state(tiny_llama, tmp_path, monkeypatch, capsys):
    from backends.colocated.worker import ColocatedWorker
    from backends.core.control import run_dir
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.messages import GenerateRequest
    from backends.core.sampling import SamplingParams
    from backends.serving.host import InstanceHost

    monkeypatch.setenv("DISTSERVE_RUN_DIR", str(tmp_path / "run"))
    limits = EngineLimits(64, max_num_seqs=4, max_num_batched_tokens=128, block_size=4,
                          chunked_prefill=True)
    worker = ColocatedWorker(LLMEngine(*tiny_llama, EngineConfig(dtype="float32", limits=limits)),
                             "colocated-0")
    done = threading.Event()
    host = InstanceHost(worker, lambda ctx, payload, final: final and done.set(), lambda ctx: False)
    path = status_path(run_dir(), "colocated-0")
    try:
        s = StatusReader(path, "colocated-0").read()
        assert (s.role, s.block_size, s.max_num_seqs, s.max_num_batched_tokens, s.local_prefill,
                s.total_kv_blocks, s.free_kv_blocks, s.requests_total) == \
            ("both", 4, 4, 128, True, 64, 64, 0)
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        host.submit(GenerateRequest("r1", [1, 2, 3, 4, 5], params), None)
        assert done.wait(30)
        deadline = time.monotonic() + 5
        while (s := StatusReader(path).read()).running or s.requests_total < 1:
            assert time.monotonic() < deadline, s
            time.sleep(0.01)
        assert (s.requests_total, s.free_kv_blocks, s.backlog_tokens, s.stale) == (1, 64, 0, False)
        assert s.last_step_s > 0 and s.step_ewma_s > 0 and s.last_batch_size == 1
        seq = s.seq
        time.sleep(0.2)                             # idle: the loop's turns keep it fresh
        assert StatusReader(path).read().seq > seq
        host.loop.stop()                            # one writer: time it from here alone
        n, started = 2000, time.perf_counter()
        for _ in range(n):
            host._publish_status()
        per_turn_us = (time.perf_counter() - started) / n * 1e6
        with capsys.disabled():
            print(f"\nhost: stats() + publish per turn {per_turn_us:.2f} us")
    finally:
        host.close()
    assert not path.exists()
