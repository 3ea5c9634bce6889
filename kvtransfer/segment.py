"""POSIX shared-memory segments: a control table and, on the shm transport, the KV pool.

Lifecycle: the prefill side calls `Segment.create()` -> /dev/shm/<name> is created with
O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600 (fchmod'ed, whatever the umask), an unguessable name
(uid + 64 random bits), after a check that SHM_DIR has the room (a clear SegmentError, not a
full /dev/shm), space reserved up front (ENOSPC now, not SIGBUS later), header written
-> decode sides call `Segment.attach()`, which checks the name, that the file is a regular file
owned by our uid with mode 0600 and exactly the expected size, and the header's magic/version,
before mapping the control part read-write and the pool read-only -> `close()` on each side; the
creator's close marks the header closed, zeroes owner[] (in-flight copies then fail their
re-check) and unlinks the name.

We open /dev/shm with os.open + mmap rather than multiprocessing.shared_memory: no resource
tracker is involved, so no process unlinks or warns about a segment another process created.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import warnings

from backends.core.kv_cache import KVLayout
from kvtransfer.control import (HEADER_NBYTES, STATE_OPEN, ControlTable, SegmentHeader,
                                control_nbytes, mark_closed, segment_geometry)
from kvtransfer.descriptor import POOL_NAME_RE, check_pool_name, make_pool_name
from kvtransfer.errors import SegmentError

SHM_DIR = "/dev/shm"
SEGMENT_MODE = 0o600


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, check_pool_name(name))


MIB = 1 << 20
GIB = 1 << 30


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


def shm_size_hint(need_bytes: int) -> str:
    """What to do about a /dev/shm too small for `need_bytes` (Docker gives 64 MiB by default)."""
    return (f"in Docker, start the container with --shm-size={-(-need_bytes // GIB) + 1}g or more; "
            f"elsewhere free space in {SHM_DIR} or give the KV pool fewer blocks (num_kv_blocks)")


def shm_free_bytes(directory: str) -> int:
    """Bytes an unprivileged process may still allocate in `directory`'s filesystem."""
    vfs = os.statvfs(directory)
    return vfs.f_bavail * vfs.f_frsize


def _check_room(what: str, nbytes: int) -> None:
    """SegmentError unless SHM_DIR is a directory with `nbytes` free. Checked before creating:
    on tmpfs a posix_fallocate that cannot succeed first fills the filesystem (every other
    process then fails to allocate in it) before it gives up."""
    if not os.path.isdir(SHM_DIR):
        raise SegmentError(f"cannot create {what}: {SHM_DIR} does not exist or is not a directory "
                           "(POSIX shared memory; Linux mounts it, and so does Docker)")
    try:
        free = shm_free_bytes(SHM_DIR)
    except OSError as e:
        raise SegmentError(f"cannot create {what}: statvfs({SHM_DIR}) failed: {e.strerror}") from None
    if free < nbytes:
        raise SegmentError(f"not enough shared memory for {what}: it needs {mib(nbytes)}, {SHM_DIR} "
                           f"has {mib(free)} free ({shm_size_hint(nbytes)})")


def _reserve(fd: int, nbytes: int, what: str) -> None:
    os.ftruncate(fd, nbytes)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):      # ENOSPC: another process was faster
            raise SegmentError(f"cannot reserve {mib(nbytes)} of shared memory in {SHM_DIR} for {what}: "
                               f"{e.strerror} ({shm_size_hint(nbytes)})") from None


def _check_file(name: str, st: os.stat_result, nbytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"{name} is not a regular file")
    if st.st_uid != os.geteuid():
        raise SegmentError(f"{name} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != SEGMENT_MODE:
        raise SegmentError(f"{name} has mode {oct(stat.S_IMODE(st.st_mode))}, expected {oct(SEGMENT_MODE)}")
    if st.st_size != nbytes:
        raise SegmentError(f"{name} has {st.st_size} bytes, the descriptor's layout needs {nbytes}")


SEGMENT_LOG_ENV = "DISTSERVE_SEGMENT_LOG"


def _log_segment(name: str) -> None:
    """Note a new segment's name where the server's launcher finds it at stop (a killed
    instance never unlinks its pool: the launcher does)."""
    path = os.environ.get(SEGMENT_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


class Segment:
    """One mapped segment. `table` is the lease table; `buffer` the pool bytes (or None)."""

    def __init__(self, name: str, header: SegmentHeader, ctrl: mmap.mmap, pool: mmap.mmap | None,
                 file_key: tuple[int, int], is_creator: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.header = header
        self.is_creator = is_creator
        self.table = ControlTable(ctrl, header.layout.num_blocks)
        self._ctrl, self._pool, self._file_key = ctrl, pool, file_key
        self.buffer: memoryview | mmap.mmap | None = pool
        if is_creator and header.pool_nbytes:
            self.buffer = memoryview(ctrl)[header.pool_offset:header.pool_offset + header.pool_nbytes]
        self.closed = False
        self._pid = os.getpid()  # a forked child must not unlink its parent's segment

    @classmethod
    def create(cls, transport: str, layout: KVLayout, instance_id: str,
               ipc_handles: tuple[str, str] = ("", "")) -> Segment:
        """A new segment for our pool. `ipc_handles`: (memory, event) hex handles for cuda_ipc."""
        pool_offset, nbytes = segment_geometry(transport, layout)
        what = f"the KV {'pool' if pool_offset else 'control table'} of {instance_id}"
        _check_room(what, nbytes)
        header = SegmentHeader(transport, layout, instance_id, os.getpid(), pool_offset,
                               layout.nbytes if pool_offset else 0, STATE_OPEN, *ipc_handles)
        name = make_pool_name()
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, SEGMENT_MODE)
        except OSError as e:        # EACCES, EROFS, ENOENT (gone since the check), ENOSPC (inodes)
            raise SegmentError(f"cannot create {what} in {SHM_DIR}: {e.strerror}") from None
        try:
            os.fchmod(fd, SEGMENT_MODE)  # the umask may only have removed bits; make it exact
            _reserve(fd, nbytes, what)
            mm = mmap.mmap(fd, nbytes)
            st = os.fstat(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mm[:HEADER_NBYTES] = header.pack().ljust(HEADER_NBYTES, b"\0")
        _log_segment(name)
        return cls(name, header, mm, None, (st.st_dev, st.st_ino), is_creator=True)

    @classmethod
    def attach(cls, name: str, transport: str, layout: KVLayout) -> Segment:
        """Map another process's segment after the ownership, mode, size and header checks."""
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(f"prefill pool {name} does not exist (instance gone?)") from None
        except OSError as e:
            raise SegmentError(f"cannot open prefill pool {name}: {e}") from None
        try:
            st = os.fstat(fd)
            pool_offset, nbytes = segment_geometry(transport, layout)
            _check_file(name, st, nbytes)
            ctrl = mmap.mmap(fd, control_nbytes(layout.num_blocks))
            try:
                header = SegmentHeader.unpack(ctrl)
                pool_nbytes = layout.nbytes if pool_offset else 0
                if (header.pool_offset, header.pool_nbytes) != (pool_offset, pool_nbytes):
                    raise SegmentError(f"{name}: header places the pool at {header.pool_offset}+"
                                       f"{header.pool_nbytes}, expected {pool_offset}")
                pool = None
                if pool_offset:
                    pool = mmap.mmap(fd, layout.nbytes, prot=mmap.PROT_READ, offset=pool_offset)
            except BaseException:
                ctrl.close()
                raise
        finally:
            os.close(fd)
        return cls(name, header, ctrl, pool, (st.st_dev, st.st_ino), is_creator=False)

    def read_header(self) -> SegmentHeader:
        """The header as it is now (the creator flips its state to closed on close)."""
        if self.closed:
            raise SegmentError(f"segment {self.name} is closed")
        return SegmentHeader.unpack(self._ctrl)

    def is_current(self) -> bool:
        """The name still refers to the file we mapped (not unlinked, not replaced)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._file_key

    def close(self) -> None:
        """Unmap (and, on the creator, invalidate and unlink). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.is_creator and os.getpid() == self._pid:
            mark_closed(self._ctrl)
            self.table.owner[:] = 0
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.table.release()
        if isinstance(self.buffer, memoryview):
            _release_view(self.buffer, self.name)
        self.buffer = None
        for mm in (self._pool, self._ctrl):
            _close_map(mm, self.name)
        self._pool = None


def _release_view(view: memoryview, name: str) -> None:
    try:
        view.release()
    except BufferError:
        warnings.warn(f"KV pool {name}: tensors over the pool are still alive; its memory is freed "
                      "when they are", ResourceWarning, stacklevel=3)


def _close_map(mm: mmap.mmap | None, name: str) -> None:
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:
        warnings.warn(f"KV segment {name}: views still alive, unmapped when they are collected",
                      ResourceWarning, stacklevel=3)


def list_segments() -> list[str]:
    """Names of this uid's distserve KV segments on the host."""
    if not os.path.isdir(SHM_DIR):
        return []
    mine = []
    for name in os.listdir(SHM_DIR):
        match = POOL_NAME_RE.match(name)
        if match and int(match.group(1)) == os.geteuid():
            mine.append(name)
    return sorted(mine)


def segment_creator_pid(name: str) -> int | None:
    """The pid that created a segment, or None if it is unreadable or not ours."""
    try:
        fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        return SegmentHeader.unpack(os.pread(fd, HEADER_NBYTES, 0)).creator_pid
    except SegmentError:
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_segments() -> list[str]:
    """Unlink our segments whose creator process is dead (e.g. killed with SIGKILL)."""
    reaped = []
    for name in list_segments():
        pid = segment_creator_pid(name)
        if pid is not None and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                reaped.append(name)
            except FileNotFoundError:
                pass
    return reaped
