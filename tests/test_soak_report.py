"""The soak's accounting (benchmarks/soak.py, benchmarks/soak_report.py) on hand-made outcomes:
error classes, and which server deaths fail the run (the killed stub never; Triton's own abort on
that kill, restarted, only up to the moment the server answered again)."""
from __future__ import annotations

from benchmarks import soak
from benchmarks.soak_report import restart_sentence, unexplained_deaths
from deploy.server import IPC_MUTEX_ABORT, crash_cause


def test_error_classes():
    assert soak.error_class("request failed: decode-0 is dead (its process is gone)") == "killed instance"
    assert soak.error_class("cannot reach Triton at 127.0.0.1:1234: Socket closed") == "server unreachable"
    assert soak.error_class("cannot reach Triton at x: failed to connect to all addresses; "
                            "last error: UNAVAILABLE") == "server unreachable"
    assert soak.error_class("request cancelled") == "cancelled"
    assert soak.error_class("overloaded: prefill-0 would reach ...") == "overload/other"
    assert set(soak.ERROR_CLASSES) >= {"killed instance", "server unreachable", "cancelled", "overload/other"}


def test_crash_cause_reads_the_old_log():
    abort = ("I1208 model loaded\nterminate called after throwing an instance of "
             "'boost::interprocess::lock_exception'\n  what():  boost::interprocess::lock_exception\n"
             "Signal (6) received.\n")
    assert crash_cause(abort) == IPC_MUTEX_ABORT
    assert crash_cause("I1208 serving\nSignal (11) received.\n 0# ...\n") == "Signal (11) received."
    assert crash_cause("I1208 serving\nI1208 stopping\n") is None
    assert crash_cause("I1208 serving\nSignal (15) received.\nI1208 unloading\n") is None   # a stop


def _proc(pid, process, gone_s=None):
    return {"pid": pid, "process": process, "alive_at_end": gone_s is None, "gone_s": gone_s}


KILL = {"pid": 30, "at_s": 5.0, "server_answering_after_s": 7.0}      # answered again at t = 12 s
OLD_SERVER = [_proc(10, "tritonserver", 5.6), _proc(30, "decode_0 stub", 5.0),
              _proc(31, "distserve stub", 8.0), _proc(32, "prefill_0 stub", 8.0)]


def test_the_killed_stub_alone_is_no_problem():
    deaths, abort = unexplained_deaths([_proc(10, "tritonserver"), _proc(30, "decode_0 stub", 5.0)],
                                       KILL, {"count": 0, "cause": None})
    assert deaths == [] and not abort


def test_a_triton_abort_on_the_kill_restarted_is_reported_not_failed():
    restarts = {"count": 1, "took_s": [6.5], "cause": IPC_MUTEX_ABORT}
    deaths, abort = unexplained_deaths(OLD_SERVER, KILL, restarts)
    assert deaths == [] and abort
    assert "abort" in restart_sentence(restarts | {"triton_ipc_mutex_abort": abort})
    later = OLD_SERVER + [_proc(40, "decode_0 stub", 20.0)]          # a death after it served again
    assert [p["pid"] for p in unexplained_deaths(later, KILL, restarts)[0]] == [40]


def test_any_other_crash_fails_the_run():
    for cause in ("Signal (11) received.", None):
        deaths, abort = unexplained_deaths(OLD_SERVER, KILL, {"count": 1, "took_s": [6.5], "cause": cause})
        assert not abort and [p["pid"] for p in deaths] == [10, 31, 32]
    no_answer = KILL | {"server_answering_after_s": None}
    deaths, abort = unexplained_deaths(OLD_SERVER, no_answer, {"count": 1, "cause": IPC_MUTEX_ABORT})
    assert abort and len(deaths) == 3
