"""The launcher's supervisor of the front-end stubs: a stub that dies gets its model reloaded."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from deploy.supervisor import Supervisor, stub_pids


def test_a_dead_stub_gets_its_model_reloaded_once():
    stubs = {"distserve": {101}}
    reloads = []

    def reload(model):
        reloads.append(model)
        stubs[model] = {202}                     # the reload starts a new stub

    sup = Supervisor(1, ("distserve",), reload, list_stubs=lambda ppid, m: set(stubs[m]))
    assert sup.check() == [] and reloads == []
    stubs["distserve"] = set()                   # killed
    assert sup.check() == ["distserve"] and reloads == ["distserve"]
    assert sup.check() == [] and sup.known["distserve"] == {202}
    stubs["distserve"] = {202, 203}              # a second instance appears: nothing to do
    assert sup.check() == []


def test_a_failed_reload_is_retried_at_the_next_death():
    stubs = {"distserve": {1}}

    def reload(model):
        raise RuntimeError("Triton refused")
    sup = Supervisor(1, ("distserve",), reload, list_stubs=lambda ppid, m: set(stubs[m]))
    sup.check()
    stubs["distserve"] = set()
    assert sup.check() == ["distserve"] and sup.reloads == []


def test_stub_pids_finds_our_children_by_model_path(tmp_path):
    script = tmp_path / "distserve" / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text("import time; time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in stub_pids(os.getpid(), "distserve"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stub_pids(os.getpid(), "prefill_0") == set()
        child.kill()
        child.wait()
        assert child.pid not in stub_pids(os.getpid(), "distserve")
    finally:
        child.kill()
        child.wait()


def test_a_recovery_that_restarts_the_server_rebases_the_watch():
    stubs = {(1, "distserve"): {11}, (1, "other"): {12}, (2, "distserve"): {21}, (2, "other"): {22}}
    calls = []

    def recover(model):                          # the server restarts: new parent, new stubs
        calls.append(model)
        sup.rebase(2)
    sup = Supervisor(1, ("distserve", "other"), recover,
                     list_stubs=lambda ppid, m: set(stubs[(ppid, m)]))
    sup.check()
    stubs[(1, "distserve")] = set()
    assert sup.check() == ["distserve"] and calls == ["distserve"]   # "other" not taken for dead
    assert sup.known == {"distserve": {21}, "other": {22}} and sup.check() == []


def test_requests_in_flight_reads_the_orchestrator_gauge(tmp_path):
    import http.server
    import threading

    from deploy.supervisor import requests_in_flight
    body = (b'# TYPE distserve_requests_in_flight gauge\n'
            b'distserve_requests_in_flight{model="distserve"} 3\n'
            b'distserve_requests_in_flight{model="distserve_colocated"} 0\n')

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/metrics"
        assert requests_in_flight(url, "distserve") == 3
        assert requests_in_flight(url, "distserve_colocated") == 0
        assert requests_in_flight(url, "missing") is None
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert requests_in_flight(url, "distserve", timeout_s=1) is None      # nothing listens

