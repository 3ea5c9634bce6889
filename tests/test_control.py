"""An engine instance's control channel: its op table (cancel, expect, stats), over a real Unix
socket."""
from __future__ import annotations

import os
import stat

import pytest

from backends.core.control import MAX_SURE_TOKENS, ControlServer, instance_handler, send


@pytest.fixture
def server(tmp_path):
    calls: list = []
    handler = instance_handler(lambda r: calls.append(("cancel", r)), lambda: {"running": 1},
                               lambda: calls.append(("wake",)),
                               lambda r, n: calls.append(("expect", r, n)))
    srv = ControlServer(tmp_path / "decode-0.sock", handler)
    yield srv, calls
    srv.close()


def test_ops_round_trip(server):
    srv, calls = server
    assert stat.S_IMODE(os.stat(srv.path).st_mode) & 0o077 == 0          # the user's only
    assert send(srv.path, {"op": "stats"}) == {"running": 1}
    assert send(srv.path, {"op": "expect", "req_id": "a", "sure_tokens": 7}) == {"ok": True}
    assert send(srv.path, {"op": "cancel", "req_id": "a"}) == {"ok": True}
    assert calls == [("expect", "a", 7), ("cancel", "a"), ("wake",)]


@pytest.mark.parametrize("msg, match", [
    ({"op": "expect", "req_id": "a"}, "sure_tokens"),
    ({"op": "expect", "req_id": "a", "sure_tokens": -1}, "sure_tokens"),
    ({"op": "expect", "req_id": "a", "sure_tokens": MAX_SURE_TOKENS + 1}, "sure_tokens"),
    ({"op": "expect", "req_id": "a", "sure_tokens": 2.5}, "sure_tokens"),
    ({"op": "expect", "req_id": "a", "sure_tokens": True}, "sure_tokens"),
    ({"op": "expect", "req_id": "", "sure_tokens": 1}, "req_id"),
    ({"op": "cancel", "req_id": 3}, "req_id"),
    ({"op": "reboot"}, "unknown op"),
])
def test_bad_messages_are_answered_with_an_error_and_change_nothing(server, msg, match):
    srv, calls = server
    reply = send(srv.path, msg)
    assert match in reply["error"] and calls == []


def test_an_instance_without_expect_refuses_it():
    handler = instance_handler(lambda r: None, dict)
    with pytest.raises(ValueError, match=r"unknown op 'expect' \(cancel, stats\)"):
        handler({"op": "expect", "req_id": "a", "sure_tokens": 1})
