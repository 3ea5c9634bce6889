"""The processes of one tritonserver: its process group, its descendants (in any group) and
its python backend stubs (found by the server's unique shm prefix in their command line, for a
stub that lost its parent and left the group). deploy/server.py stops and sweeps them."""
from __future__ import annotations

import os
import signal

import psutil


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int, marker: str | None = None) -> list[psutil.Process]:
    """Live processes in process group `pgid`, plus the server's descendants (in any group),
    plus (with `marker`) any process with `marker` in its command line: the server's python
    backend stubs carry its unique shm prefix there, so a stub started late (a model load
    while the server exits) that lost its parent and left the group is still found."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if (os.getpgid(proc.pid) == pgid or (marker and any(marker in a for a in proc.cmdline()))) \
                    and alive(proc):
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    try:
        for child in psutil.Process(pgid).children(recursive=True):
            found.setdefault(child.pid, child)
    except psutil.NoSuchProcess:
        pass
    return [p for p in found.values() if alive(p)]


def reap(members: list[psutil.Process], pgid: int, timeout: float) -> None:
    """Wait for the group's processes to go; SIGKILL whatever is left at the deadline."""
    _, left = psutil.wait_procs([p for p in members if alive(p)], timeout=timeout)
    for proc in left + group_members(pgid):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
