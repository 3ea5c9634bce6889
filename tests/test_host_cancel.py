"""How an instance learns that a client cancelled (backends/serving/host.py): it asks Triton's
request.is_cancelled(), an IPC round trip under the stub's shared-memory mutexes, at most every
CANCEL_POLL_PERIOD_S, not every engine step; a cancelled request still stops and frees its KV."""
from __future__ import annotations

import threading
import time


def _host(tiny_llama, tmp_path, monkeypatch, is_cancelled, sent):
    import backends.serving.host as host_module
    from backends.colocated.worker import ColocatedWorker
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits

    monkeypatch.setenv("DISTSERVE_RUN_DIR", str(tmp_path / "run"))
    limits = EngineLimits(512, max_num_seqs=4, max_num_batched_tokens=128, block_size=4)
    worker = ColocatedWorker(LLMEngine(*tiny_llama, EngineConfig(dtype="float32", limits=limits)),
                             "colocated-0")

    def send(ctx, payload, final):
        sent.append((ctx, final))
    return host_module, host_module.InstanceHost(worker, send, is_cancelled)


def _request(req_id: str, max_tokens: int):
    from backends.core.messages import GenerateRequest
    from backends.core.sampling import SamplingParams
    return GenerateRequest(req_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_cancellation_is_polled_at_most_every_period_not_every_step(tiny_llama, tmp_path, monkeypatch):
    calls: list[float] = []
    sent: list = []

    def is_cancelled(ctx):
        calls.append(time.monotonic())
        return False
    host_module, host = _host(tiny_llama, tmp_path, monkeypatch, is_cancelled, sent)
    try:
        started = time.monotonic()
        host.submit(_request("r1", 200), "r1")
        deadline = time.monotonic() + 60
        while not any(final for _, final in sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        steps = len(sent)
    finally:
        host.close()
    assert steps >= 100, steps                       # a message per step (tokens)
    period = host_module.CANCEL_POLL_PERIOD_S
    assert len(calls) <= elapsed / period + 2, (len(calls), elapsed)
    assert len(calls) < steps / 3, (len(calls), steps)   # far fewer round trips than tokens
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert all(g >= period * 0.99 for g in gaps), min(gaps)


def test_a_cancelled_request_stops_within_a_poll_period_and_frees_its_kv(tiny_llama, tmp_path, monkeypatch):
    cancelled = threading.Event()
    sent: list = []
    host_module, host = _host(tiny_llama, tmp_path, monkeypatch, lambda ctx: cancelled.is_set(), sent)
    try:
        host.submit(_request("r1", 240), "r1")           # long enough to be cut short
        deadline = time.monotonic() + 30
        while len(sent) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(sent) >= 5
        cancelled.set()
        at = time.monotonic()
        while host.worker.stats()["kv_blocks_used"] and time.monotonic() < at + 10:
            time.sleep(0.005)
        freed_after = time.monotonic() - at
        stats = host.worker.stats()
    finally:
        host.close()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0, stats
    assert len(sent) < 200                                   # it did not run to the end
    assert freed_after < host_module.CANCEL_POLL_PERIOD_S + 2.0, freed_after
