"""Instance status pages: each engine instance publishes its load where the orchestrator reads
it without a round trip (issue 12, item 2).

    path = status_path(run_dir(), "decode-0")                # next to the control socket
    writer = StatusWriter(path, "decode-0", role="decode")   # the instance, once
    writer.publish(running=3, running_context=412, ...)      # its step thread, after each step
    writer.close()                                           # removes the page

    reader = StatusReader(path)                              # the orchestrator, any number
    status = reader.read()       # InstanceStatus, or None: no page (not started, or closed)
    if status and not status.stale:
        state = to_instance_state(status)                    # what backends.core.router takes

One writer (the instance's step thread), many readers, in other processes. The page is a
512-byte file mapped by both sides (writer read-write, readers read-only):

    offset  type     field
    0       8s       magic b"DSSTATUS"
    8       u32      version (3)
    12      u32      page size (512)
    16      i64      writer pid
    24      u32      role: 0 both (colocated), 1 prefill, 2 decode
    28      u32      reserved (0)
    32      64s      instance id (ASCII, NUL-padded)
    96      u64      sequence counter (seqlock: odd while a write is in progress; native order)
    104     f64      written_at: time.monotonic() of the last write (CLOCK_MONOTONIC, host-wide)
    112     20 x 8   the fields of FIELDS, in order (i64, or f64 for the *_s and rate fields)
    272     u32      CRC-32 of bytes 104..272
    276     ...      zero up to 512 (room for later fields; a layout change bumps the version)

A write: counter odd, the fields and their CRC, counter even. A reader copies the fields between
two reads of the counter and keeps the copy only if both reads are equal and even and the CRC
matches; otherwise it tries again (for up to READ_WAIT_S), so it never returns a torn update.
The counter is stored and loaded as one aligned 8-byte word through a memoryview cast to "Q"
(struct.pack_into zero-fills its target before packing byte by byte: a reader would see the
counter pass through 0). The CRC keeps the rule where stores and loads may be reordered
(Python has no memory barriers; x86-64 keeps them in order, aarch64 need not).

Security (the project's rules for shared memory): the page lives in the server's private run
directory (0700, ours; `backends.core.control.run_dir`), never in /dev/shm under a guessable
name. The writer creates it 0600 under a temporary name (O_CREAT|O_EXCL|O_NOFOLLOW, fchmod
whatever the umask), fills it, then renames it into place, so a reader never sees a half-made
page and an existing file at the path (a page left by a killed instance, or anything else) is
replaced without being opened, truncated or followed. A reader refuses (StatusPageError) a page
that is not a regular file owned by this uid with mode 0600 and exactly PAGE_SIZE bytes, with
this magic and version, in a directory of ours that no one else can write; it opens with
O_NOFOLLOW and maps read-only. A page whose writer pid is gone, or whose last write is older
than `stale_after_s`, is returned with `stale=True` and the reason: not to be trusted. The
writer unlinks the page at close, only if the path is still its own (a restarted instance may
have replaced it).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import stat
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from backends.core.control import socket_path
from backends.core.router import InstanceState

log = logging.getLogger(__name__)

MAGIC = b"DSSTATUS"
VERSION = 3
PAGE_SIZE = 512
ROLES = ("both", "prefill", "decode")
STALE_AFTER_S = 5.0          # a page not written for this long is stale (a step this long, too)
READ_WAIT_S = 0.02           # how long a reader waits out a write in progress

_HEADER = struct.Struct("<8sIIqII64s")
SEQ_OFFSET = 96

# The published fields, in page order: (name, struct code). Counts are i64, times and rates f64.
FIELDS: tuple[tuple[str, str], ...] = (
    ("backlog_tokens", "q"),          # prompt tokens accepted, not yet prefilled
    ("queued_requests", "q"),         # the requests they belong to (waiting for a prefill)
    ("running", "q"),                 # sequences in the batch or loading their KV
    ("running_context", "q"),         # their context lengths, summed
    ("pending", "q"),                 # decode: sequences waiting for KV (no blocks yet)
    ("loading", "q"),                 # decode: sequences whose KV is being copied in
    ("free_kv_blocks", "q"),          # neither held nor promised
    ("total_kv_blocks", "q"),
    ("block_size", "q"),
    ("max_num_seqs", "q"),
    ("max_num_batched_tokens", "q"),
    ("local_prefill", "q"),           # 1: prompts are prefilled in its (mixed) steps
    ("last_step_s", "d"),             # the last step that ran a batch: its duration
    ("last_batch_size", "q"),         # ... and its sequences
    ("step_ewma_s", "d"),             # an EWMA of step durations (0: no step yet)
    ("prefill_rate", "d"),            # prompt tokens per second of prefilling (0: unknown)
    ("requests_total", "q"),
    ("rejected_total", "q"),
    ("tokens_per_step", "d"),         # decode: tokens a decoding sequence gets per step (EWMA;
                                      # 1 without speculation, more with accepted drafts)
    ("tpot_slack_s", "d"),            # decode, adaptive: the running batch's TPOT slack
)                                     # (backends.core.tpot_slack.tpot_slack; 0: none, < 0: behind)
FIELD_NAMES = tuple(name for name, _ in FIELDS)
_INDEX = {name: i + 1 for i, name in enumerate(FIELD_NAMES)}    # 0 is written_at
_BODY = struct.Struct("<d" + "".join(code for _, code in FIELDS))
_CRC = struct.Struct("<I")
BODY_OFFSET = SEQ_OFFSET + 8
CRC_OFFSET = BODY_OFFSET + _BODY.size
assert _HEADER.size == SEQ_OFFSET and CRC_OFFSET + _CRC.size <= PAGE_SIZE


class StatusPageError(ValueError):
    """A status page refused: not a file this server wrote (wrong owner, mode, type, size,
    magic, version or instance), or its directory is not private."""


@dataclass(frozen=True)
class InstanceStatus:
    instance_id: str
    pid: int                          # the writer's
    role: Literal["both", "prefill", "decode"]
    seq: int                          # the seqlock counter: 2 x writes so far
    written_at: float                 # time.monotonic() of the last write
    age_s: float                      # of that write, when read
    stale: bool                       # do not trust: see stale_reason
    stale_reason: str
    backlog_tokens: int
    queued_requests: int
    running: int
    running_context: int
    pending: int
    loading: int
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    local_prefill: bool
    last_step_s: float
    last_batch_size: int
    step_ewma_s: float
    prefill_rate: float
    requests_total: int
    rejected_total: int
    tokens_per_step: float
    tpot_slack_s: float


def status_path(directory: Path, instance_id: str) -> Path:
    """`<directory>/<instance_id>.status`, beside the instance's control socket."""
    return socket_path(directory, instance_id).with_name(f"{instance_id}.status")


def _check_directory(directory: Path) -> None:
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StatusPageError(f"{directory} is not a private directory of uid {os.geteuid()} "
                              f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)})")


def _check_file(path: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"owned by uid {st.st_uid}, not {os.geteuid()}" if st.st_uid != os.geteuid() else
           f"mode {mode:04o}, not 0600" if mode != 0o600 else
           f"{st.st_size} bytes, not {PAGE_SIZE}" if st.st_size != PAGE_SIZE else "")
    if why:
        raise StatusPageError(f"status page {path} refused: {why}")


def _counter(mm: mmap.mmap) -> memoryview:
    """The seqlock counter as one aligned 8-byte word (page-aligned map, offset 96)."""
    return memoryview(mm)[SEQ_OFFSET:SEQ_OFFSET + 8].cast("Q")


def _unmap(mm: mmap.mmap, counter: memoryview | None) -> None:
    if counter is not None:
        counter.release()                 # an exported view would keep the map open
    mm.close()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                   # someone else's process: it exists
    return True


class StatusWriter:
    """Creates the page at `path` (replacing whatever is there) and publishes into it. Not
    thread-safe: one thread publishes (the others only before it starts or after it stops)."""

    def __init__(self, path: Path | str, instance_id: str, role: str = "both",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        name = instance_id.encode("ascii")
        if not 0 < len(name) <= 64:
            raise ValueError(f"bad instance id {instance_id!r}")
        self.instance_id = instance_id
        self._clock = clock
        self._values: list = [0.0] + [0.0 if code == "d" else 0 for _, code in FIELDS]
        self._buf = bytearray(CRC_OFFSET + _CRC.size - BODY_OFFSET)
        self._body = memoryview(self._buf)[:_BODY.size]
        self._seq = 0
        _check_directory(self.path.parent)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)                         # whatever the umask
            os.ftruncate(fd, PAGE_SIZE)
            self._mm = mmap.mmap(fd, PAGE_SIZE)          # MAP_SHARED, read-write
            self._seqv = _counter(self._mm)
            st = os.fstat(fd)
            self._ident = (st.st_dev, st.st_ino)
            _HEADER.pack_into(self._mm, 0, MAGIC, VERSION, PAGE_SIZE, os.getpid(),
                              ROLES.index(role), 0, name)
            self.publish()                               # a whole page before anyone can see it
            self._replace(tmp)
        except BaseException:
            if getattr(self, "_mm", None) is not None:
                _unmap(self._mm, getattr(self, "_seqv", None))
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._closed = False

    def _replace(self, tmp: Path) -> None:
        """Rename the new page over `path` (never opening what is there), saying what it was."""
        try:
            old = os.lstat(self.path)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise StatusPageError(f"{self.path} is a directory")
        if old is not None:
            try:
                prev = StatusReader(self.path).read()
            except (StatusPageError, OSError) as e:
                log.warning("replacing %s: %s", self.path, e)
            else:
                if prev is not None and not prev.stale and prev.pid != os.getpid():
                    log.warning("replacing the status page of %s, whose writer (pid %d) is alive",
                                prev.instance_id, prev.pid)
        os.rename(tmp, self.path)

    def publish(self, **fields: float) -> None:
        """Write the named fields (the others keep their last values) and the time, as one
        update. TypeError for an unknown field, ValueError for a value that does not fit."""
        values = self._values
        for name, value in fields.items():
            i = _INDEX.get(name)
            if i is None:
                raise TypeError(f"unknown status field {name!r} (fields: {', '.join(FIELD_NAMES)})")
            values[i] = value
        values[0] = self._clock()
        mm = self._mm
        try:
            _BODY.pack_into(self._buf, 0, *values)
        except struct.error as e:
            values[:] = _BODY.unpack_from(mm, BODY_OFFSET)          # the last good values
            raise ValueError(f"status fields {sorted(fields)}: {e}") from None
        _CRC.pack_into(self._buf, _BODY.size, zlib.crc32(self._body))
        seq = self._seq + 1
        self._seqv[0] = seq                                         # odd: a write in progress
        mm[BODY_OFFSET:CRC_OFFSET + _CRC.size] = self._buf
        self._seqv[0] = seq + 1
        self._seq = seq + 1

    def close(self) -> None:
        """Remove the page (if the path is still ours) and unmap it. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                self.path.unlink()
        except FileNotFoundError:
            pass
        _unmap(self._mm, self._seqv)

    def __enter__(self) -> StatusWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StatusReader:
    """Reads one instance's page (any process of this uid; cheap enough to call per request).
    The page is mapped on the first read and mapped again when the path is replaced."""

    def __init__(self, path: Path | str, instance_id: str | None = None,
                 stale_after_s: float = STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.instance_id = instance_id
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._mm: mmap.mmap | None = None
        self._seqv: memoryview | None = None
        self._ident: tuple[int, int] | None = None
        self._header: tuple = ()

    def read(self) -> InstanceStatus | None:
        """The instance's status; None if there is no page (not started, or closed);
        StatusPageError if the page there is refused."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            self.close()
            return None
        if (st.st_dev, st.st_ino) != self._ident:
            self.close()
            if not self._open():
                return None
        else:
            _check_file(self.path, st)
        seq, values, torn = self._snapshot()
        pid, role, name = self._header
        now = self._clock()
        age = now - values[0]
        reason = ("no consistent snapshot: a write has been in progress for over "
                  f"{READ_WAIT_S * 1e3:.0f} ms" if torn else
                  f"writer pid {pid} is gone" if not _pid_alive(pid) else
                  f"last written {age:.1f} s ago" if not 0 <= age <= self.stale_after_s else "")
        v = dict(zip(FIELD_NAMES, values[1:]))
        v["local_prefill"] = bool(v["local_prefill"])
        return InstanceStatus(name, pid, role, seq, values[0], age, bool(reason),
                              reason, **v)

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StatusPageError(f"status page {self.path} refused: a symbolic link") from None
            raise
        try:
            st = os.fstat(fd)
            _check_file(self.path, st)
            _check_directory(self.path.parent)
            mm = mmap.mmap(fd, PAGE_SIZE, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        magic, version, size, pid, role, _, name = _HEADER.unpack_from(mm, 0)
        why = (f"magic {magic!r}" if magic != MAGIC else
               f"version {version}, not {VERSION}" if version != VERSION else
               f"page size {size}" if size != PAGE_SIZE else
               f"role {role}" if role >= len(ROLES) else "")
        name = name.rstrip(b"\0").decode("ascii", "replace")
        if not why and self.instance_id is not None and name != self.instance_id:
            why = f"instance {name!r}, not {self.instance_id!r}"
        if why:
            mm.close()
            raise StatusPageError(f"status page {self.path} refused: {why}")
        self._mm, self._seqv = mm, _counter(mm)
        self._ident, self._header = (st.st_dev, st.st_ino), (pid, ROLES[role], name)
        return True

    def _snapshot(self) -> tuple[int, tuple, bool]:
        """(counter, written_at and the fields, torn): a consistent copy, or the last try and
        torn=True."""
        mm, counter, deadline, tries = self._mm, self._seqv, None, 0
        while True:
            seq = counter[0]
            body = mm[BODY_OFFSET:CRC_OFFSET + _CRC.size]
            if (not seq & 1 and counter[0] == seq
                    and zlib.crc32(body[:_BODY.size]) == _CRC.unpack_from(body, _BODY.size)[0]):
                return seq, _BODY.unpack_from(body), False
            tries += 1
            if tries > 64:                       # the writer is mid-write: give it time
                now = time.monotonic()
                deadline = deadline or now + READ_WAIT_S
                if now > deadline:
                    return seq, _BODY.unpack_from(body), True
                time.sleep(50e-6)

    def close(self) -> None:
        if self._mm is not None:
            _unmap(self._mm, self._seqv)
        self._mm, self._seqv, self._ident, self._header = None, None, None, ()


def to_instance_state(status: InstanceStatus,
                      phase: Literal["prefill", "decode"] | None = None) -> InstanceState:
    """The router's view of a (fresh) status. `phase` defaults to the role, a colocated
    instance counting as a decode instance (that prefills locally if it runs mixed steps).
    ValueError for a stale status: an instance that may be gone is no place to route to."""
    if status.stale:
        raise ValueError(f"{status.instance_id}: stale status ({status.stale_reason})")
    phase = phase or ("prefill" if status.role == "prefill" else "decode")
    decode = phase == "decode"
    return InstanceState(
        status.instance_id, phase, status.free_kv_blocks,
        queued_tokens=status.backlog_tokens,
        queued_requests=status.queued_requests,
        num_running=status.running + status.pending if decode else status.running,
        running_context=status.running_context, block_size=status.block_size,
        max_num_seqs=status.max_num_seqs, max_num_batched_tokens=status.max_num_batched_tokens,
        local_prefill=decode and status.local_prefill,
        recent_step_s=status.step_ewma_s if decode and status.step_ewma_s > 0 else None,
        prefill_rate=status.prefill_rate if not decode and status.prefill_rate > 0 else None,
        tokens_per_step=status.tokens_per_step if decode and status.tokens_per_step >= 1 else 1.0,
        step_slack_s=status.tpot_slack_s if decode else 0.0)
