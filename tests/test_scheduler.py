"""The scheduler on its own: every state change a request goes through, step by step (no model).

`make_request` / `make_scheduler` build the pieces; every scheduler a test makes is checked at
the end for leaks (all blocks back, no sequence left in any queue) once the test has finished
its sequences."""
from __future__ import annotations

import pytest

from backends.core.kv_cache import BlockManager
from backends.core.limits import EngineLimits
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Scheduler
from backends.core.sequence import FinishReason, Sequence, SequenceStatus

EOS = 2


@pytest.fixture
def made():
    schedulers: list[Scheduler] = []
    yield schedulers
    for s in schedulers:
        assert not s.has_work(), "sequences left in the scheduler's queues"
        assert s.blocks.num_used == 0, f"{s.blocks.num_used} KV blocks leaked"


@pytest.fixture
def make_scheduler(made):
    def make(hand_off: bool = False, max_model_len: int | None = None, **limits) -> Scheduler:
        lim = EngineLimits(**{"num_kv_blocks": 16, "max_num_seqs": 4, "max_num_batched_tokens": 64,
                              "block_size": 4, **limits})
        s = Scheduler(lim, BlockManager(lim.num_kv_blocks), hand_off, frozenset({EOS}), max_model_len)
        made.append(s)
        return s
    return make


def make_request(req_id: str, prompt_len: int = 6, max_tokens: int = 4, first_token: int | None = None,
                 **params) -> Sequence:
    return Sequence(req_id, [5] * prompt_len, SamplingParams(max_tokens=max_tokens, seed=0, **params),
                    output_ids=[] if first_token is None else [first_token])


def run(s: Scheduler, token: int = 7, now: float = 0.0) -> list[tuple[str, FinishReason | None]]:
    """One step with `token` for every sampled row: (req_id, finish reason) per sampled row."""
    batch = s.schedule(now)
    assert batch is not None
    return [(seq.req_id, r) for seq, _, r in s.update(batch, [token] * len(batch.sampled_seqs))]


def drain(s: Scheduler) -> None:
    while s.has_runnable():
        run(s)


def test_prefill_then_decode_then_finish_frees_blocks(make_scheduler):
    s = make_scheduler()
    a, b = make_request("a", max_tokens=3), make_request("b", prompt_len=9, max_tokens=2)
    s.add(a)
    s.add(b)
    assert run(s, now=1.5) == [("a", None), ("b", None)]          # one prefill batch, FCFS
    assert a.scheduled_time == b.scheduled_time == 1.5
    assert (a.num_cached, b.num_cached) == (6, 9) and a.status == SequenceStatus.RUNNING
    assert run(s) == [("a", None), ("b", FinishReason.LENGTH)]
    assert b.status == SequenceStatus.FINISHED and not b.block_ids
    assert run(s) == [("a", FinishReason.LENGTH)]
    assert a.output_ids == [7, 7, 7] and a.num_tokens == 9


def test_budget_and_batch_cap_split_prefills(make_scheduler):
    s = make_scheduler(max_num_batched_tokens=10, max_num_seqs=2)
    for i in range(3):
        s.add(make_request(f"r{i}", prompt_len=4, max_tokens=1))
    assert [r for r, _ in run(s)] == ["r0", "r1"]                  # 8 tokens; the cap is 2
    assert [r for r, _ in run(s)] == ["r2"]
    assert not s.has_work()


def test_stop_rules(make_scheduler):
    s = make_scheduler(max_model_len=8)
    s.add(make_request("eos", max_tokens=9))
    s.add(make_request("ignore", max_tokens=2, ignore_eos=True))
    s.add(make_request("stop_id", max_tokens=9, stop_token_ids=(EOS,), ignore_eos=True))
    s.add(make_request("context", prompt_len=6, max_tokens=9, ignore_eos=True))
    reasons = dict(run(s, token=EOS))
    assert reasons == {"eos": FinishReason.STOP, "ignore": None, "stop_id": FinishReason.STOP,
                       "context": None}
    assert dict(run(s, token=EOS)) == {"ignore": FinishReason.LENGTH, "context": FinishReason.LENGTH}


def test_preemption_frees_the_newest_and_recomputes_it(make_scheduler):
    s = make_scheduler(num_kv_blocks=5)
    a, b = make_request("a", prompt_len=8, max_tokens=6), make_request("b", prompt_len=8, max_tokens=6)
    s.add(a)
    s.add(b)
    run(s)                                                       # 4 of 5 blocks
    batch = s.schedule()                                         # a needs a 3rd block: b goes
    assert batch.preempted == [b] and b.status == SequenceStatus.WAITING and not b.block_ids
    assert b.num_cached == 0 and b.output_ids == [7]             # recomputed from its tokens
    s.update(batch, [7])
    drain(s)
    assert a.finish_reason == b.finish_reason == FinishReason.LENGTH


def test_chunked_prefill_runs_decodes_first_and_chunks_the_rest(make_scheduler):
    s = make_scheduler(chunked_prefill=True, max_num_batched_tokens=8)
    s.add(make_request("short", prompt_len=3, max_tokens=5))
    assert run(s) == [("short", None)]
    long = make_request("long", prompt_len=13, max_tokens=1)
    s.add(long)
    batch = s.schedule()
    assert [q.req_id for q in batch.seqs] == ["short", "long"] and batch.num_new == [1, 7]
    assert batch.sampled_seqs == [batch.seqs[0]]                 # the chunk yields no token
    s.update(batch, [7])
    assert long.num_cached == 7 and not long.output_ids
    run(s)                                                       # 1 decode + the last 6 tokens
    assert long.finish_reason == FinishReason.LENGTH
    drain(s)


def test_hand_off_keeps_blocks_until_finished(make_scheduler):
    s = make_scheduler(hand_off=True)
    seq = make_request("a", max_tokens=4)
    s.add(seq)
    assert run(s) == [("a", None)]
    assert seq.status == SequenceStatus.PREFILLED and seq.block_ids and not s.has_work()
    assert s.blocks.num_used == 2
    s.finish(seq)                                                # the KV was handed off


def test_remote_admission_is_fifo_under_blocks_and_slots(make_scheduler):
    s = make_scheduler(num_kv_blocks=4, max_num_seqs=2)
    a = make_request("a", prompt_len=8, first_token=9, max_tokens=3)     # 2 blocks
    b = make_request("b", prompt_len=12, first_token=9, max_tokens=2)    # 3 blocks
    c = make_request("c", prompt_len=4, first_token=9, max_tokens=2)     # 1 block
    for seq in (a, b, c):
        s.add_remote(seq)
    assert c.status == SequenceStatus.WAITING_FOR_KV
    assert s.admit_remote() == [a]                  # b does not fit; c must not jump the queue
    assert list(s.remote) == [b, c] and not s.has_runnable() and s.has_work()
    with pytest.raises(ValueError, match="not loading"):
        s.kv_arrived(c)                             # never admitted
    s.kv_arrived(a)
    assert a.status == SequenceStatus.RUNNING and a.num_cached == 8
    drain(s)                                        # a decodes to its end, freeing its blocks
    assert a.finish_reason == FinishReason.LENGTH
    assert s.admit_remote() == [b, c]
    for seq in (b, c):
        s.kv_arrived(seq)
    drain(s)


def test_remote_sequences_count_against_the_batch_cap(make_scheduler):
    s = make_scheduler(max_num_seqs=1)
    s.add_remote(make_request("a", first_token=9, max_tokens=2))
    s.add(b := make_request("b", max_tokens=1))
    (a,) = s.admit_remote()
    assert s.schedule() is None                     # a's slot is taken while its KV loads
    s.kv_arrived(a)
    batch = s.schedule()
    assert batch.seqs == [a]                        # b still waits for the slot
    s.update(batch, [7])
    drain(s)
    assert a.finish_reason == b.finish_reason == FinishReason.LENGTH


def test_finishing_from_any_queue_frees_its_blocks(make_scheduler):
    s = make_scheduler()
    waiting, remote = make_request("w"), make_request("r", first_token=9)
    s.add(waiting)
    s.add_remote(remote)
    s.add_remote(loading := make_request("l", first_token=9))
    s.finish(waiting)
    s.remote.remove(remote)
    s.remote.appendleft(remote)
    assert [q.req_id for q in s.admit_remote()] == ["r", "l"]
    s.finish(remote)
    s.finish(loading)
    assert all(q.status == SequenceStatus.FINISHED for q in (waiting, remote, loading))


def test_decodes_next_says_whether_drafts_can_ride_the_next_step(make_scheduler):
    """The default policy prefills first whenever a waiting prompt has a seat (a drafter asked
    before such a step drafts for nothing); the chunked policy verifies drafts beside a chunk;
    a prefill engine never verifies."""
    s = make_scheduler(max_num_seqs=2)
    s.add(make_request("a", max_tokens=3))
    assert not s.decodes_next()                         # a's prefill comes first
    run(s)
    assert s.decodes_next()                             # a decodes, nothing waits
    s.add(make_request("b", max_tokens=2))
    assert not s.decodes_next()                         # b has a seat: a prefill step
    run(s)
    s.add(make_request("c", max_tokens=2))
    assert s.decodes_next()                             # c waits for a seat: a and b decode
    drain(s)
    chunked = make_scheduler(chunked_prefill=True)
    chunked.add(make_request("d", max_tokens=2))
    assert chunked.decodes_next()
    drain(chunked)
    assert not make_scheduler(hand_off=True).decodes_next()
