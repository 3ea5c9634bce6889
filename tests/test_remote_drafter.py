"""The drafter on cores of its own (backends/draft): the wire format and its validation, the
drafter's per-sequence state, proposal alignment, the client's handling of a malformed, killed,
stopped, stalled or congested drafter and of its own end (no zombie, no fd left), and a decode
instance on the default model speculating with it: the tokens of plain decoding (float32), a
drafter SIGKILLed or SIGSTOPped mid-stream, cancellation, nothing held after."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.messages import Failed
from backends.core.sampling import SamplingParams
from backends.core.sequence import Sequence
from backends.core.spec_decode import NgramDrafter
from backends.core.spec_policy import AdaptiveK
from backends.core.speculator import Speculator
from backends.decode.worker import DecodeWorker
from backends.draft import DrafterSpec, RemoteDrafter, aligned_draft
from backends.draft.protocol import MAX_SCORE, FROM_DRAFTER, TO_DRAFTER, Frame, FrameReader, Kind, ProtocolError
from backends.draft.server import DraftServer
from backends.prefill.worker import PrefillWorker
from backends.serving.host import _speculator
from deploy.deployment import Deployment, PhaseSpec, default_deployment
from kvtransfer import make_exporter, make_importer
from tests.helpers import assert_no_leaks
from tests.test_spec_worker import assert_nothing_held, decode_all, handed_off

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 100
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def seq(tokens: list[int], req_id: str = "a") -> Sequence:
    return Sequence(req_id, list(tokens), GREEDY)


def spec(**kw) -> DrafterSpec:
    return DrafterSpec(**{"method": "ngram", "num_draft": 6, "vocab_size": VOCAB, "cores": (0,),
                          "backoff_s": 0.1, **kw})


def wait_for(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def is_gone(pid: int) -> bool:
    """Not running: reaped, or a zombie some other parent has to reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def our_children() -> list[psutil.Process]:
    """Drafters (real or fake) this test process started and has not reaped, zombies included."""
    out = []
    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE or "draft" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def held_by_drafter(drafter: RemoteDrafter) -> int | None:
    drafter.drafter_sequences = None
    drafter.ping()
    wait_for(lambda: drafter.drafter_sequences is not None, 5.0)
    return drafter.drafter_sequences


# -- the wire format and the drafter's state --------------------------------------------------
def test_frames_round_trip_in_any_pieces():
    frames = [Frame(Kind.RESET, 1, 0, [1, 2, 3]), Frame(Kind.APPEND, 1, 3, [4]), Frame(Kind.DROP, 1),
              Frame(Kind.PING)]
    data = b"".join(f.encode() for f in frames)
    reader = FrameReader(TO_DRAFTER, 8, VOCAB)
    got = [f for i in range(len(data)) for f in reader.feed(data[i:i + 1])]
    assert got == frames
    scored = Frame(Kind.PROPOSAL, 7, 3, [1, 2], score=MAX_SCORE)
    assert FrameReader(FROM_DRAFTER, 8, VOCAB).feed(scored.encode()) == [scored]


UNKNOWN_KIND = bytes([99]) + bytes(15)


@pytest.mark.parametrize("data, match", [
    (Frame(Kind.RESET, 1, 0, [1]).encode(), "unexpected frame kind 1"),     # the other direction
    (UNKNOWN_KIND, "unexpected frame kind 99"),
    (Frame(Kind.PROPOSAL, 1, 0, [VOCAB]).encode(), "outside"),
    (Frame(Kind.PROPOSAL, 1, 0, [-1]).encode(), "outside"),
    (Frame(Kind.PROPOSAL, 1, 0, [1] * 7).encode(), "carries 7 tokens"),
    (Frame(Kind.PROPOSAL, 0, 0, [1]).encode(), "bad sid"),
    (Frame(Kind.PONG, 3, 0).encode(), "bad sid"),
    (Frame(Kind.PONG, score=4).encode(), "a score"),
], ids=["wrong-direction", "unknown-kind", "token-too-large", "negative-token", "too-long",
        "no-sid", "stray-sid", "stray-score"])
def test_a_malformed_frame_is_refused(data, match):
    with pytest.raises(ProtocolError, match=match):
        FrameReader(FROM_DRAFTER, 6, VOCAB).feed(data)


def test_the_drafter_keeps_histories_and_proposes_once_per_sequence_at_its_end():
    server = DraftServer(NgramDrafter(), num_draft=3, max_len=64)
    out = server.handle([Frame(Kind.RESET, 1, 0, [5, 6, 7, 5]), Frame(Kind.APPEND, 1, 4, [6]),
                         Frame(Kind.RESET, 2, 0, [9]), Frame(Kind.DROP, 2), Frame(Kind.PING)])
    # scored by its match: [5, 6] ends the history and was seen at the start (nothing before it)
    assert out == [Frame(Kind.PONG, base=1), Frame(Kind.PROPOSAL, 1, 5, [7, 5, 6], score=2)]
    assert set(server._drafts._indexes) == {1}               # its n-gram index, kept between rounds
    assert server.handle([Frame(Kind.APPEND, 1, 5, [7])]) == [Frame(Kind.PROPOSAL, 1, 6, [5, 6, 7], score=3)]
    assert server.handle([Frame(Kind.DROP, 1), Frame(Kind.PING)]) == [Frame(Kind.PONG, base=0)]
    assert not server._drafts._indexes
    with pytest.raises(ProtocolError, match="APPEND to sequence 1 at 4, but it holds none"):
        server.handle([Frame(Kind.APPEND, 1, 4, [6])])
    with pytest.raises(ProtocolError, match="grows past 64"):
        server.handle([Frame(Kind.RESET, 1, 0, [1] * 60), Frame(Kind.APPEND, 1, 60, [1] * 5)])


def test_a_proposal_serves_only_while_the_sequence_follows_it():
    draft = [7, 8, 9, 10]
    assert aligned_draft(seq([1, 2, 3]), 3, draft, 3) == [7, 8, 9]            # fresh, clipped to k
    assert aligned_draft(seq([1, 2, 3, 7, 8]), 3, draft, 3) == [9, 10]        # two accepted
    assert aligned_draft(seq([1, 2, 3, 7, 5]), 3, draft, 3) == []             # went another way
    assert aligned_draft(seq([1, 2, 3, 7, 8, 9, 10]), 3, draft, 3) == []      # used up
    assert aligned_draft(seq([1, 2]), 3, draft, 3) == []                      # made at a later length


# -- the client and its process ---------------------------------------------------------------
# a stand-in drafter: after argv[3] seconds it writes the bytes argv[2] (hex) to its socket argv[1]
FAKE = ("import os, sys, time; time.sleep(float(sys.argv[3])); "
        "os.write(int(sys.argv[1]), bytes.fromhex(sys.argv[2])); time.sleep(60)")


@pytest.mark.parametrize("bad", [Frame(Kind.PROPOSAL, 1, 3, [VOCAB + 5]).encode(),
                                 Frame(Kind.PROPOSAL, 1, 50, [1]).encode(), UNKNOWN_KIND],
                         ids=["token-outside-vocab", "unsent-length", "unknown-kind"])
def test_a_malformed_message_takes_the_drafter_down_not_the_instance(monkeypatch, bad):
    data = Frame(Kind.READY).encode() + bad
    monkeypatch.setattr(DrafterSpec, "argv", lambda self, fd: [sys.executable, "-c", FAKE, str(fd),
                                                               data.hex(), "0.3"])
    drafter = RemoteDrafter(spec())
    s = seq([1, 2, 3])
    try:
        assert wait_for(lambda: drafter.pid is not None)
        drafter.update([s])                                   # sequence 1, 3 tokens
        assert wait_for(lambda: drafter.counts.failures >= 1)
        drafter.update([s])                                   # down or up again: no error either way
        assert drafter.draft(s, 3) == []
    finally:
        drafter.close()
    assert not our_children()


def test_killed_drafter_is_reaped_and_restarted_and_close_leaves_nothing():
    fds = len(os.listdir("/proc/self/fd"))
    drafter = RemoteDrafter(spec())
    assert drafter.wait_up(30)
    assert os.sched_getaffinity(drafter.pid) == {0}
    s = seq([1, 2, 3, 1, 2])
    drafter.update([s])
    assert wait_for(lambda: drafter.draft(s, 2) == [3, 1])
    assert drafter.scored and drafter.draft_scored(s, 2) == ([3, 1], 2)    # the match's length
    first = drafter.pid
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: drafter.counts.failures == 1 and is_gone(first))
    assert drafter.draft(s, 2) == []                          # down: its proposals went with it
    assert drafter.wait_up(30) and drafter.pid != first
    drafter.update([s])                                       # the whole history again
    assert wait_for(lambda: drafter.draft(s, 2) == [3, 1])
    second = drafter.pid
    os.kill(second, signal.SIGSTOP)                           # closing a stopped one: killed
    drafter.close()
    assert is_gone(second) and not our_children()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_stalled_drafter_is_replaced_after_the_stall_timeout():
    drafter = RemoteDrafter(spec(stall_timeout_s=0.5))
    try:
        assert drafter.wait_up(30)
        stalled = drafter.pid
        os.kill(stalled, signal.SIGSTOP)
        s = seq([1, 2, 1])
        started = time.monotonic()
        drafter.update([s])
        assert time.monotonic() - started < 0.05
        assert wait_for(lambda: drafter.counts.failures == 1 and is_gone(stalled), 10)
        assert drafter.wait_up(30) and drafter.pid != stalled
    finally:
        drafter.close()


def test_a_congested_drafter_drops_updates_then_resyncs_every_history():
    drafter = RemoteDrafter(spec(send_buffer_bytes=4096))
    seqs = [seq(list(range(i, i + 10)) * 1000, f"r{i}") for i in range(40)]     # 40 KB each
    try:
        assert drafter.wait_up(30)
        os.kill(drafter.pid, signal.SIGSTOP)
        for s in seqs:
            started = time.monotonic()
            drafter.update([s])
            assert time.monotonic() - started < 0.05          # never blocks on the full socket
        assert drafter.counts.dropped_updates > 0
        os.kill(drafter.pid, signal.SIGCONT)

        def all_drafted() -> bool:
            drafter.update(seqs)                              # as each step does
            return all(drafter.draft(s, 2) == s.prompt_ids[:2] for s in seqs)
        assert wait_for(all_drafted)
        assert held_by_drafter(drafter) == len(seqs)
        for s in seqs:
            drafter.forget(s.req_id)
        assert held_by_drafter(drafter) == 0 and drafter.num_sequences == 0
    finally:
        drafter.close()


def test_the_drafter_exits_when_its_parent_dies():
    code = ("from backends.draft import DrafterSpec, RemoteDrafter; import time; "
            "d = RemoteDrafter(DrafterSpec('ngram', 4, 100)); assert d.wait_up(60); "
            "print(d.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert wait_for(lambda: is_gone(pid), 10)


# -- a decode instance on the default model ---------------------------------------------------
@pytest.fixture(scope="module")
def prompts(smollm_tokenizer):
    tok = smollm_tokenizer
    return [tok.encode("The cat sat on the mat. The dog sat on the log. " * 3, add_special_tokens=False),
            tok.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n",
                       add_special_tokens=False)]


@pytest.fixture(scope="module")
def system(smollm_fp32, prompts):
    """(prefill worker, make_decode(speculator), the plain decoding tokens)."""
    config, sd = smollm_fp32

    def ecfg(role: str) -> EngineConfig:
        return EngineConfig(dtype="float32", role=role, limits=EngineLimits(64), max_model_len=1024)
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, ecfg("prefill")), "prefill-0",
                             lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, ecfg("prefill"), kv_pool=exporter.pool), exporter,
                            "prefill-0")
    workers = [prefill]

    def make_decode(speculator):
        engine = LLMEngine(config, sd, ecfg("decode"))
        workers.append(DecodeWorker(engine, make_importer("shm", engine.kv), "decode-0",
                                    clock=lambda: 0.0, speculator=speculator))
        return workers[-1]
    plain = decode_all(make_decode(None), handed_off(prefill, prompts, GREEDY))
    yield prefill, make_decode, plain
    for w in workers:
        w.close()
    assert not our_children()


def remote_decode(system, vocab_size: int = 49152) -> tuple[DecodeWorker, RemoteDrafter]:
    drafter = RemoteDrafter(spec(vocab_size=vocab_size, max_len=1024))
    worker = system[1](Speculator(drafter, AdaptiveK(3)))
    assert drafter.wait_up(30)
    return worker, drafter


def step_until(worker: DecodeWorker, cond, out: dict[str, list[int]], max_steps: int = 10 ** 6
               ) -> list[float]:
    """Step `worker` (collecting tokens into `out`) until cond() or `max_steps`; each step's
    seconds."""
    seconds = []
    while worker.has_work() and not cond() and len(seconds) < max_steps:
        started = time.monotonic()
        for _, msg in worker.step():
            assert not isinstance(msg, Failed), msg
            out[msg.req_id] = out.get(msg.req_id, []) + list(getattr(msg, "token_ids", ()))
        seconds.append(time.monotonic() - started)
    return seconds


def start(system, prompts, worker) -> dict[str, list[int]]:
    reqs = handed_off(system[0], prompts, GREEDY)
    for r in reqs:
        worker.submit(r)
    return {r.req_id: [r.first_token_id] for r in reqs}


def assert_all_freed(system, worker, drafter) -> None:
    assert_nothing_held(worker)
    assert drafter.num_sequences == 0 and held_by_drafter(drafter) == 0
    system[0].step()
    assert_no_leaks(system[0].engine)
    pid = drafter.pid
    worker.speculator.close()
    assert is_gone(pid) and drafter.pid is None


def test_remote_drafts_give_the_tokens_of_plain_decoding(system, prompts):
    worker, drafter = remote_decode(system)
    out = start(system, prompts, worker)
    step_until(worker, lambda: False, out)
    assert out == system[2]
    stats = worker.stats()
    assert stats["drafter_drafts"] > 0 and stats["spec_accepted"] > 0, stats
    assert stats["drafter_up"] == 1 and stats["drafter_failures"] == 0
    assert_all_freed(system, worker, drafter)


def test_a_drafter_killed_mid_stream_is_decoded_past_and_restarted(system, prompts):
    worker, drafter = remote_decode(system)
    out = start(system, prompts, worker)
    step_until(worker, lambda: worker.stats()["drafter_drafts"] >= 2, out)
    killed = drafter.pid
    os.kill(killed, signal.SIGKILL)
    step_until(worker, lambda: False, out)
    assert out == system[2]
    assert drafter.counts.failures == 1 and is_gone(killed)
    assert drafter.wait_up(30) and drafter.pid != killed
    assert_all_freed(system, worker, drafter)


def test_a_stopped_drafter_never_holds_up_a_step(system, prompts):
    worker, drafter = remote_decode(system)
    out = start(system, prompts, worker)
    step_until(worker, lambda: worker.stats()["drafter_drafts"] >= 2, out)
    os.kill(drafter.pid, signal.SIGSTOP)
    try:
        stopped = step_until(worker, lambda: False, out, max_steps=6)
        answered = drafter.counts.proposals
        assert len(stopped) == 6 and max(stopped) < 2.0, stopped      # a step takes ~0.1 s
        assert worker.has_work() and drafter.is_up
    finally:
        os.kill(drafter.pid, signal.SIGCONT)
    step_until(worker, lambda: False, out)
    assert out == system[2] and drafter.counts.proposals > answered   # it answers again
    assert_all_freed(system, worker, drafter)


def test_cancel_mid_speculation_frees_everything_here_and_in_the_drafter(system, prompts):
    worker, drafter = remote_decode(system)
    out = start(system, prompts[:1], worker)
    step_until(worker, lambda: worker.stats()["spec_steps"] >= 1, out)
    assert drafter.num_sequences == 1 and held_by_drafter(drafter) == 1
    worker.cancel("r0")
    assert [type(m) for _, m in worker.step()] == [Failed]
    assert_all_freed(system, worker, drafter)


# -- the deployment ---------------------------------------------------------------------------
def test_draft_devices_are_a_phase_field_rendered_only_when_set():
    base = default_deployment(num_cores=2)
    assert "draft_devices" not in base.to_json()
    on = dataclasses.replace(base, decode=dataclasses.replace(base.decode, speculative="ngram",
                                                              draft_devices=[[0]]))
    again = Deployment.from_json(on.to_json(), check_host=False)
    assert again == on and again.decode.draft_cores(0) == (0,) and base.decode.draft_cores(0) is None
    for bad, match in [({"draft_devices": [[0]]}, "speculative is null"),
                       ({"speculative": "ngram", "draft_devices": [[0], [1]]}, "one core set per instance"),
                       ({"speculative": "ngram", "draft_devices": [[]]}, "draft_devices of a cpu phase"),
                       ({"speculative": "ngram", "device": "gpu", "devices": [0], "draft_devices": [1]},
                        "a drafter on its own gpu is not built")]:
        with pytest.raises(ValueError, match=match):
            PhaseSpec(**bad)
    with pytest.raises(ValueError, match="decode.draft_devices: core 7 does not exist"):
        dataclasses.replace(on, decode=dataclasses.replace(on.decode, draft_devices=[[7]]))


def test_draft_devices_start_a_drafter_process_on_those_cores():
    base = default_deployment(num_cores=2)
    phase = dataclasses.replace(base.decode, speculative="ngram", draft_devices=[[0]])
    speculator = _speculator(base, phase, 0, VOCAB)
    try:
        drafter = speculator.source
        assert isinstance(drafter, RemoteDrafter) and drafter.spec.cores == (0,)
        assert drafter.spec.num_draft == 2 * phase.num_speculative_tokens
    finally:
        speculator.close()
    local = _speculator(base, dataclasses.replace(phase, draft_devices=None), 0, VOCAB)
    assert not isinstance(local.source, RemoteDrafter)
