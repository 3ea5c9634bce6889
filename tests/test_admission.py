"""Early rejection: the backlog's bookkeeping, the policy, and a real worker refusing at once."""
from __future__ import annotations

import pytest

from backends.colocated.worker import ColocatedWorker
from backends.core.admission import AdmissionPolicy, Backlog, Overloaded
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.messages import Failed, GenerateRequest, Tokens
from backends.core.sampling import SamplingParams
from deploy.deployment import default_deployment
from tests.helpers import assert_no_leaks

PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


class TickClock:
    """Each reading is one second after the previous one: a step measures as 1 s."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_backlog_counts_and_measures():
    b = Backlog(decay=0.5)
    b.ratio_min_tokens = 0                       # the plain ratio (one step size, or no fit)
    assert b.rate is None and b.predicted_wait(100) is None
    b.add(300)
    b.add(100)
    assert (b.tokens, b.requests) == (400, 2)
    b.observe(400, 2.0)
    assert b.rate == pytest.approx(200.0)
    assert b.predicted_wait(100) == pytest.approx(2.5)       # (400 + 100) / 200
    b.observe(100, 0.1)                                       # decayed: (200 + 100) / (1 + 0.1)
    assert b.rate == pytest.approx(300 / 1.1)
    b.done(300)
    b.done(100)
    assert (b.tokens, b.requests) == (0, 0)


def test_policy_refuses_by_predicted_wait_and_queue_length():
    b = Backlog()
    policy = AdmissionPolicy(max_wait_s=2.0, max_queued=3)
    b.add(1000)
    policy.check(b, 10_000, "prefill-0")         # no rate measured yet: only the length bound
    b.observe(1000, 1.0)                         # 1000 tokens/s
    policy.check(b, 900)                         # 1.9 s
    with pytest.raises(Overloaded, match=r"prefill-0 would reach .* about 2\.1 s .*1000 prompt "
                                         r"tokens queued ahead at 1000 tokens/s.* 2 s limit"):
        policy.check(b, 1100, "prefill-0")
    AdmissionPolicy(max_wait_s=None, max_queued=3).check(b, 10**6)   # no wait bound
    b.add(1)
    b.add(1)
    with pytest.raises(Overloaded, match="3 requests waiting for prefill .*bound is 3"):
        AdmissionPolicy(max_wait_s=None, max_queued=3).check(b, 1)
    assert Overloaded("x").code == "overloaded"


@pytest.mark.parametrize("bad", [dict(max_wait_s=0.0), dict(max_queued=0)])
def test_policy_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        AdmissionPolicy(**bad)


def test_deployment_turns_its_slo_into_the_policy():
    d = default_deployment("m.gguf", num_cores=2)
    assert d.admission() == AdmissionPolicy(d.overload_factor * d.slo_ttft_s, d.max_queued_requests)
    off = d.__class__.from_dict({**d.to_dict(), "overload_factor": None})
    assert off.admission().max_wait_s is None
    with pytest.raises(ValueError, match="overload_factor must be a number > 0"):
        d.__class__.from_dict({**d.to_dict(), "overload_factor": 0})


@pytest.fixture
def worker_factory(tiny_llama):
    config, sd = tiny_llama
    made = []

    def make(policy: AdmissionPolicy) -> ColocatedWorker:
        cfg = EngineConfig(dtype="float32", role="both", limits=EngineLimits(64, max_num_seqs=1, block_size=4))
        w = ColocatedWorker(LLMEngine(config, sd, cfg), "colocated-0", TickClock(), policy)
        w.backlog.ratio_min_tokens = 0           # tiny prompts: let the ratio stand
        made.append(w)
        return w
    yield make
    for w in made:
        assert_no_leaks(w.engine)
        assert (w.backlog.tokens, w.backlog.requests) == (0, 0)


def run_all(worker) -> list:
    out = []
    while worker.has_work():
        out += [msg for _, msg in worker.step()]
    return out


def req(i: int, n: int) -> GenerateRequest:
    return GenerateRequest(f"r{i}", list(range(1, n + 1)), PARAMS)


def test_worker_refuses_beyond_its_queue_bound_and_recovers(worker_factory):
    w = worker_factory(AdmissionPolicy(max_wait_s=None, max_queued=2))
    w.submit(req(0, 8))
    w.submit(req(1, 8))
    with pytest.raises(Overloaded):
        w.submit(req(2, 8))
    assert w.stats()["rejected_total"] == 1 and w.stats()["backlog_tokens"] == 16
    w.cancel("r1")                                  # a cancelled request leaves the backlog
    msgs = run_all(w)
    assert any(isinstance(m, Failed) and m.req_id == "r1" for m in msgs)
    assert sum(len(m.token_ids) for m in msgs if isinstance(m, Tokens) and m.req_id == "r0") == 3
    w.submit(req(3, 8))                             # room again
    run_all(w)


def test_worker_refuses_what_it_predicts_it_cannot_start_in_time(worker_factory):
    """One 20-token prefill step measures 1 s (TickClock): 20 tokens/s. With a 1.5 s bound a
    20-token request alone (1 s) is admitted, one behind another (2 s) is refused."""
    w = worker_factory(AdmissionPolicy(max_wait_s=1.5, max_queued=100))
    w.submit(req(0, 20))
    run_all(w)
    assert w.backlog.rate == pytest.approx(20.0)
    w.submit(req(1, 20))
    with pytest.raises(Overloaded, match=r"about 2\.0 s"):
        w.submit(req(2, 20))
    w.submit(req(3, 5))                             # (20 + 5) / 20 = 1.25 s: fits
    run_all(w)
    assert w.num_rejected == 1


def test_duplicate_id_leaves_no_backlog(worker_factory):
    w = worker_factory(AdmissionPolicy(max_wait_s=None, max_queued=10))
    w.submit(req(0, 8))
    w.submit(req(0, 8))
    msgs = run_all(w)
    assert any(isinstance(m, Failed) and "already in flight" in m.error for m in msgs)


def test_the_prefill_line_separates_per_step_and_per_token_costs_and_messages_stay_readable():
    """A 2-token warm-up step of 0.1 s must not read as 20 tokens/s for a 500-token prompt (the
    adaptive server test was refused '42 s' for an idle instance): t = a + b * tokens."""
    b = Backlog(decay=0.9)
    b.observe(2, 0.1016)                           # a = 0.1, b = 0.0008
    b.observe(500, 0.5)
    b.observe(100, 0.18)
    assert b.predicted_wait(500) == pytest.approx(0.5, rel=1e-6)
    assert b.rate == pytest.approx(1250.0, rel=1e-6)
    AdmissionPolicy(max_wait_s=1.0).check(b, 500)  # idle: 0.5 s, admitted
    warm = Backlog()
    warm.observe(2, 0.1)                           # one small step: no evidence, no refusal
    assert warm.predicted_wait(500) is None
    slow = Backlog()
    slow.ratio_min_tokens = 0
    slow.add(900)
    slow.observe(1, 5000.0)                        # the soak once printed a 200-digit wait
    with pytest.raises(Overloaded, match=r"in more than an hour \(900 prompt tokens queued ahead "
                                         r"at 0\.0002 tokens/s"):
        AdmissionPolicy(max_wait_s=10.0).check(slow, 10, "prefill-0")


def test_worker_measures_prompt_tokens_computed_per_step(worker_factory):
    """Chunked: a 20-token prompt over 8-token steps is measured as it goes, not when it ends."""
    w = worker_factory(AdmissionPolicy(max_wait_s=None, max_queued=10))
    w.engine.scheduler.config = EngineLimits(64, max_num_seqs=1, max_num_batched_tokens=8,
                                                    block_size=4, chunked_prefill=True)
    w.submit(req(0, 20))
    w.step()                                # first 8-token chunk, 1 s on the TickClock
    assert w.backlog.rate == pytest.approx(8.0)
    run_all(w)
