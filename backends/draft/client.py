"""RemoteDrafter: a decode instance's side of a drafter process on cores of its own (server.py).

    drafter = RemoteDrafter(DrafterSpec("ngram", num_draft=6, vocab_size=V, cores=(0,)))
    drafter.update(seqs)             # the step thread: their new tokens, sent without blocking
    drafter.draft(seq, k)            # the step thread: the ready proposal that still fits, or []
    drafter.forget(req_id)           # finished or cancelled
    drafter.close()                  # the child ended and reaped

The step thread never waits for the drafter. It queues frames into a bounded buffer and writes
what the socket takes at once; an update that does not fit is dropped, and the sequence's next
update carries every token the drafter has not had (a sequence counts as sent only as far as
frames for it were queued). A DROP that does not fit waits for room; too many waiting take the
drafter down. `update()` also takes in whatever answers have arrived, without waiting (the
supervisor may not have had the GIL since).

The supervisor thread starts the child, reads its frames (a PROPOSAL replaces the sequence's
last one) and watches it: EOF, a socket error, a malformed frame, the child's exit, or no
answer for `stall_timeout_s` take it down (killed, reaped, its proposals dropped), and it is
started again after a backoff that doubles up to `max_backoff_s`. While it is down `draft()`
returns [] and the instance decodes plainly. A stopped child that comes back just answers late.

Alignment (`aligned_draft`): a proposal made at length L with tokens d is usable at length
M >= L iff tokens[L:M] == d[:M - L] (the target accepted that much of it); the draft is then
d[M - L:]. So a proposal that arrives a step late, or was longer than the step verified, still
serves, and any other is never used.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from backends.core.sequence import Sequence
from backends.core.spec_decode import DRAFTERS
from backends.draft.protocol import FROM_DRAFTER, Frame, FrameReader, Kind, ProtocolError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.05                      # the supervisor checks the child and its own stop this often
MAX_PENDING_DROPS = 1 << 14        # finished sequences the drafter has not been told of


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter process: `method` (spec_decode.DRAFTERS) with `options` (JSON keywords of its
    constructor), `num_draft` tokens per proposal, pinned to `cores` (() : not pinned)."""
    method: str
    num_draft: int
    vocab_size: int
    cores: tuple[int, ...] = ()
    max_len: int = 1 << 20
    options: str = "{}"
    send_buffer_bytes: int = 1 << 20
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stall_timeout_s: float | None = 30.0    # no answer to an update for this long: replaced
    start_timeout_s: float = 60.0           # not READY this long after its start: replaced

    def __post_init__(self) -> None:
        if self.method not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.method!r}; known: {sorted(DRAFTERS)}")
        if not isinstance(json.loads(self.options), dict):
            raise ValueError(f"options must be a JSON object, got {self.options!r}")
        if min(self.num_draft, self.vocab_size, self.max_len, self.send_buffer_bytes) < 1:
            raise ValueError(f"num_draft, vocab_size, max_len, send_buffer_bytes must be >= 1: {self}")
        if not 0 < self.backoff_s <= self.max_backoff_s or not self.start_timeout_s > 0 or not (
                self.stall_timeout_s is None or self.stall_timeout_s > 0):
            raise ValueError(f"bad drafter backoff or stall timeout: {self}")

    def argv(self, fd: int) -> list[str]:
        return [_python(), "-m", "backends.draft.server", "--fd", str(fd), "--method", self.method,
                "--num-draft", str(self.num_draft), "--vocab-size", str(self.vocab_size),
                "--max-len", str(self.max_len), "--cores", ",".join(map(str, self.cores)),
                "--options", self.options, "--parent", str(os.getpid())]


def aligned_draft(seq: Sequence, base: int, draft: list[int], k: int) -> list[int]:
    """Up to k tokens of a proposal made at `base` tokens that follow `seq` as it is now
    ([] if the sequence went another way, or used it up)."""
    done = seq.num_tokens - base
    if not 0 <= done < len(draft) or k <= 0:
        return []
    if done and seq.token_ids(base, seq.num_tokens) != draft[:done]:
        return []
    return draft[done:done + k]


@dataclass
class _Seq:
    sid: int
    sent: int = 0              # its tokens queued on this connection (0: send them all)
    high: int = 0              # the most ever queued on this connection: a proposal's base <= it
    proposal: tuple[int, list[int], int] | None = None     # (base, tokens, score), the latest


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    proc: subprocess.Popen
    reader: FrameReader
    started: float
    out: bytearray = field(default_factory=bytearray)
    drops: list[int] = field(default_factory=list)      # DROPs waiting for room in `out`
    ready: bool = False
    awaiting: float | None = None      # since when an update waits for an answer
    broken: str | None = None          # a send failed: why


@dataclass
class DrafterCounts:
    starts: int = 0
    failures: int = 0                  # taken down: dead, stalled or malformed
    dropped_updates: int = 0           # frames that found the buffer full
    proposals: int = 0                 # received
    drafts: int = 0                    # draft() calls that returned tokens
    unaligned: int = 0                 # ... that found a proposal the sequence had left behind


class RemoteDrafter:
    """A Speculator's DraftSource (spec_sources.py) backed by a drafter process."""

    def __init__(self, spec: DrafterSpec) -> None:
        self.spec = spec
        # its drafts carry a score (the n-gram's match length), which the Speculator's policy uses
        self.scored = callable(getattr(DRAFTERS[spec.method], "propose_scored", None))
        self.counts = DrafterCounts()
        self.drafter_sequences: int | None = None     # what its last PONG said it holds
        self._lock = threading.Lock()
        self._seqs: dict[str, _Seq] = {}
        self._sids: dict[int, _Seq] = {}
        self._next_sid = 1
        self._conn: _Conn | None = None
        self._closed = threading.Event()
        self._backoff = spec.backoff_s
        self._restart_at = 0.0
        self._thread = threading.Thread(target=self._supervise, name="drafter-supervisor", daemon=True)
        self._thread.start()

    # -- the step thread ------------------------------------------------------------------------
    def update(self, seqs: Iterable[Sequence]) -> None:
        """Send each sequence's tokens the drafter has not had, and take in the proposals that
        have arrived (never blocks)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            self._queue_drops(conn)
            for seq in seqs:
                st = self._seqs.get(seq.req_id) or self._track(seq.req_id)
                n = seq.num_tokens
                if n == st.sent:
                    continue
                frame = (Frame(Kind.APPEND, st.sid, st.sent, seq.token_ids(st.sent, n)) if 0 < st.sent < n
                         else Frame(Kind.RESET, st.sid, 0, seq.token_ids(0, n)))
                if self._queue(conn, frame):
                    st.sent, st.high = n, max(st.high, n)
                    conn.awaiting = conn.awaiting or time.monotonic()
            self._flush(conn)
            self._take_ready(conn)        # answers the supervisor has not read yet: fresher drafts

    def draft(self, seq: Sequence, k: int) -> list[int]:
        return self.draft_scored(seq, k)[0]

    def draft_scored(self, seq: Sequence, k: int) -> tuple[list[int], int]:
        """(draft, the drafter's score for it: the n-gram's match length; 0 unscored)."""
        with self._lock:
            st = self._seqs.get(seq.req_id)
            proposal = st.proposal if st is not None else None
        if proposal is None:
            return [], 0
        base, tokens, score = proposal
        draft = aligned_draft(seq, base, tokens, k)
        self.counts.drafts += bool(draft)
        self.counts.unaligned += not draft
        return draft, score if draft else 0

    def forget(self, req_id: str) -> None:
        with self._lock:
            st = self._seqs.pop(req_id, None)
            if st is None:
                return
            del self._sids[st.sid]
            conn = self._conn
            if conn is None or not st.sent:
                return
            conn.drops.append(st.sid)
            if len(conn.drops) > MAX_PENDING_DROPS:
                conn.broken = f"{len(conn.drops)} sequences left that it was not told of"
            self._queue_drops(conn)
            self._flush(conn)

    def ping(self) -> None:
        """Ask how many sequences the drafter holds (the answer lands in drafter_sequences)."""
        with self._lock:
            if (conn := self._conn) is not None and self._queue(conn, Frame(Kind.PING)):
                self._flush(conn)

    def _track(self, req_id: str) -> _Seq:
        st = self._seqs[req_id] = self._sids[self._next_sid] = _Seq(self._next_sid)
        self._next_sid += 1
        return st

    def _queue(self, conn: _Conn, frame: Frame) -> bool:
        """Put `frame` in the buffer if it fits (an empty buffer takes any frame), writing
        what the socket takes first if it does not; False: dropped."""
        data = frame.encode()
        if conn.out and len(conn.out) + len(data) > self.spec.send_buffer_bytes:
            self._flush(conn)
            if conn.out and len(conn.out) + len(data) > self.spec.send_buffer_bytes:
                self.counts.dropped_updates += 1
                return False
        conn.out += data
        return True

    def _queue_drops(self, conn: _Conn) -> None:
        while conn.drops and self._queue(conn, Frame(Kind.DROP, conn.drops[-1])):
            conn.drops.pop()

    def _flush(self, conn: _Conn) -> None:
        """Write what the socket takes now."""
        while conn.out and conn.broken is None:
            try:
                del conn.out[:conn.sock.send(conn.out)]
            except BlockingIOError:
                return
            except OSError as e:
                conn.broken = f"a send failed ({e})"
                return

    # -- state --------------------------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        conn = self._conn
        return conn is not None and conn.ready

    @property
    def pid(self) -> int | None:
        conn = self._conn
        return None if conn is None else conn.proc.pid

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def wait_up(self, timeout: float) -> bool:
        """Whether the drafter is up within `timeout` seconds (tests and benchmarks; the step
        thread never waits)."""
        deadline = time.monotonic() + timeout
        while not self.is_up and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.is_up

    def stats(self) -> dict[str, float]:
        c = self.counts
        return {"drafter_up": int(self.is_up), "drafter_pid": self.pid or 0, "drafter_starts": c.starts,
                "drafter_failures": c.failures, "drafter_dropped_updates": c.dropped_updates,
                "drafter_proposals": c.proposals, "drafter_drafts": c.drafts,
                "drafter_unaligned": c.unaligned}

    def close(self) -> None:
        """Stop the supervisor; the child gets EOF and exits (killed if it does not) and is reaped."""
        self._closed.set()
        self._thread.join()

    # -- the supervisor thread -------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._closed.is_set():
            conn = self._start()
            if conn is None:
                continue
            try:
                why = self._watch(conn)
            except Exception as e:            # noqa: BLE001 - never leave the child behind
                log.exception("watching the drafter failed")
                why = f"the supervisor failed ({e!r})"
            self._take_down(conn, why)

    def _start(self) -> _Conn | None:
        if self._closed.wait(max(0.0, self._restart_at - time.monotonic())):
            return None
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(self.spec.argv(theirs.fileno()), pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, env=_child_env())
        except OSError as e:
            ours.close()
            log.error("cannot start the drafter: %s", e)
            self._schedule_restart()
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        conn = _Conn(ours, proc, FrameReader(FROM_DRAFTER, self.spec.num_draft, self.spec.vocab_size),
                     time.monotonic())
        with self._lock:
            self._conn = conn
            self.counts.starts += 1
        return conn

    def _watch(self, conn: _Conn) -> str | None:
        """Serve `conn` until it fails (why) or the client closes (None)."""
        while not self._closed.is_set():
            if why := conn.broken or self._stalled(conn):
                return why
            if (status := conn.proc.poll()) is not None:
                return f"it exited with status {status}"
            if select.select([conn.sock], [], [], POLL_S)[0]:
                with self._lock:
                    self._take_ready(conn)
        return None

    def _stalled(self, conn: _Conn) -> str | None:
        now = time.monotonic()
        if not conn.ready:
            late = now - conn.started > self.spec.start_timeout_s
            return f"not ready after {self.spec.start_timeout_s} s" if late else None
        timeout = self.spec.stall_timeout_s
        late = timeout is not None and conn.awaiting is not None and now - conn.awaiting > timeout
        return f"no answer for {timeout} s" if late else None

    def _take_ready(self, conn: _Conn) -> None:
        """Apply every frame the socket holds now, without waiting (either thread, under the
        lock); a failure marks the connection broken, for the supervisor to take down."""
        while conn.broken is None:
            try:
                data = conn.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                conn.broken = f"socket error ({e})"
                return
            if not data:
                conn.broken = "it closed its socket"
                return
            try:
                self._apply(conn, conn.reader.feed(data))
            except ProtocolError as e:
                conn.broken = f"it sent a malformed frame ({e})"

    def _apply(self, conn: _Conn, frames: list[Frame]) -> None:
        conn.awaiting = None
        for f in frames:
            if f.kind == Kind.READY:
                conn.ready = True
            elif f.kind == Kind.PONG:
                self.drafter_sequences = f.base
            elif (st := self._sids.get(f.sid)) is not None:       # a PROPOSAL still wanted
                if f.base > st.high:
                    raise ProtocolError(f"a proposal at {f.base} tokens for a sequence sent {st.high}")
                st.proposal = (f.base, f.tokens, f.score)
                self.counts.proposals += 1

    def _take_down(self, conn: _Conn, why: str | None) -> None:
        with self._lock:
            self._conn = None
            for st in self._seqs.values():
                st.sent, st.high, st.proposal = 0, 0, None
            conn.sock.close()
        _reap(conn.proc, grace_s=1.0 if why is None and conn.ready else 0.0)
        if why is None:
            return
        self.counts.failures += 1
        if time.monotonic() - conn.started >= self.spec.max_backoff_s:
            self._backoff = self.spec.backoff_s              # it had been healthy a while
        log.warning("drafter %d down: %s; restarting in %.1f s", conn.proc.pid, why, self._backoff)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, self.spec.max_backoff_s)


def _reap(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait `grace_s` for the child to exit, then kill it; reaped either way."""
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _python() -> str:
    """This interpreter (inside Triton's python-backend stub sys.executable may be the stub)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return str(Path(sys.exec_prefix) / "bin" / "python3")


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
