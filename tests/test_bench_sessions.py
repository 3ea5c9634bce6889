"""The closed-loop multi-turn replay: sessions from conversations (each turn's prompt extends the
last one token for token), the user loop (turn k+1 after turn k), and the sweep's goodput."""
from __future__ import annotations

import asyncio

import pytest

from client.bench.metrics import SLO, RequestResult
from client.bench.sessions import build_sessions, replay_sessions, summarize, sweep_goodput


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.replace("\n", " \n ").split(" ") if w]


def conv(i, *pairs):
    msgs = []
    for human, gpt in pairs:
        msgs += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": f"c{i}", "conversations": msgs}


RECORDS = [conv(0, ("hi there", "hello you")),                                  # one exchange
           conv(1, ("a bb ccc", "dd ee"), ("fff g", "hh ii jj"), ("k", "ll")),
           conv(2, ("one two", "three"), ("four five six", "seven eight"))]


def test_sessions_extend_their_prompts_and_skip_short_conversations():
    sessions = build_sessions(RECORDS, WordTokenizer(), 2, seed=0, max_output_tokens=2)
    assert sorted(len(s) for s in sessions) == [2, 3]              # c0 has one exchange: left out
    for s in sessions:
        for prev, nxt in zip(s, s[1:]):
            assert nxt.request.prompt_ids[:prev.request.prompt_len] == prev.request.prompt_ids
            assert nxt.turn == prev.turn + 1
        assert all(t.request.output_len <= 2 for t in s)
    with pytest.raises(ValueError, match="usable turns"):
        build_sessions(RECORDS, WordTokenizer(), 3)
    capped = build_sessions(RECORDS, WordTokenizer(), 1, max_total_tokens=12, seed=0)
    assert all(t.request.prompt_len + t.request.output_len <= 12 for s in capped for t in s)


class FakeEndpoint:
    """Answers after `delay` s; records the order turns were sent in."""
    name = "fake"

    def __init__(self, delay=0.01):
        self.delay, self.sent = delay, []

    async def stream(self, req):
        from client.bench.endpoints import StreamEvent
        self.sent.append(req.source)
        await asyncio.sleep(self.delay)
        for i in range(req.output_len):
            yield StreamEvent(1, "length" if i == req.output_len - 1 else None)


def test_users_send_each_turn_after_the_last_and_every_turn_is_run():
    sessions = build_sessions(RECORDS, WordTokenizer(), 2, seed=0)
    endpoint = FakeEndpoint()
    results, seconds = asyncio.run(replay_sessions(endpoint, sessions, 2, think_s=0.0))
    assert len(results) == sum(len(s) for s in sessions) and seconds > 0
    for s in sessions:
        order = [endpoint.sent.index(t.request.source) for t in s]
        assert order == sorted(order)
    assert all(r.ok for _, r in results)
    point = summarize(results, seconds, SLO(ttft_s=10, tpot_s=10))
    assert point["attainment"] == 1.0 and point["goodput_rps"] > 0
    assert point["ttft_first_turn_p50_s"] is not None and point["ttft_later_turns_p50_s"] is not None


def test_sweep_goodput_takes_the_best_point_that_attains_the_target():
    points = {1: {"attainment": 1.0, "goodput_rps": 0.5}, 2: {"attainment": 0.95, "goodput_rps": 0.9},
              4: {"attainment": 0.6, "goodput_rps": 1.2}}
    assert sweep_goodput(points) == 0.9
    assert sweep_goodput({1: {"attainment": 0.5, "goodput_rps": 1.0}}) == 0.0
    assert RequestResult(0, 1, 1, 0.0).ok is False


def test_sweep_users_runs_every_count(monkeypatch):
    import client.bench.endpoints as endpoints
    from client.bench.sessions import sweep_users

    class Opened(FakeEndpoint):
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            pass
    monkeypatch.setattr(endpoints, "make_endpoint", lambda *a: Opened(0.0))
    sessions = build_sessions(RECORDS, WordTokenizer(), 2, seed=0)
    lines = []
    points = sweep_users("fake", "url", "m", sessions, [1, 2], SLO(ttft_s=10, tpot_s=10),
                         think_s=0.0, log=lines.append)
    assert sorted(points) == [1, 2] and len(lines) == 2
    assert all(p["requests"] == 5 and p["attainment"] == 1.0 for p in points.values())


def test_summarize_counts_which_slo_each_miss_broke():
    from client.bench.sessions import Turn
    rs = [RequestResult(0, 10, 4, 0.0, ttft_s=0.5, tpot_s=0.05, num_tokens=4),     # meets both
          RequestResult(1, 10, 4, 0.0, ttft_s=2.0, tpot_s=0.05, num_tokens=4),     # TTFT
          RequestResult(2, 10, 4, 0.0, ttft_s=0.5, tpot_s=0.20, num_tokens=4),     # TPOT
          RequestResult(3, 10, 4, 0.0, ttft_s=3.0, tpot_s=0.30, num_tokens=4)]     # both
    turns = [Turn(session=i, turn=0, request=None) for i in range(len(rs))]
    point = summarize(list(zip(turns, rs)), 4.0, SLO(ttft_s=1.0, tpot_s=0.1))
    assert point["attainment"] == 0.25
    assert (point["missed_ttft"], point["missed_tpot"]) == (2, 2)
    assert point["tpot_p50_s"] == 0.20 and point["tpot_p90_s"] == 0.30
