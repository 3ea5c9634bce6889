"""Weights shared between the instances of one deployment on one host: n instances, one copy.

Lifecycle (CPU, `share_module`): every instance builds its model as usual (weights in their
final, possibly quantized form), then calls `share_module(model, directory, key)`. Under a
per-key flock in `directory` (private: ours, not writable by others) the first instance to
arrive writes each distinct storage of the module's parameters and buffers (tied weights are
one storage, so they stay tied) into ONE file `<key>.weights`: a header with a JSON index,
then the storages at aligned offsets; written 0600 under a temporary name and renamed into
place. Every instance, the first included, then maps the file read-only and MAP_SHARED and
rebinds each tensor's `.data` to a view of the mapping, freeing its private copy: the pages
live once in the page cache (tmpfs under /dev/shm) and PSS splits them between the mappers.
A later instance with the same key only validates the index against its module and maps.
The mapping is read-only: a write into a shared weight faults, so share after the last
in-place change (quantization, loading, dtype casts).

Lifecycle (GPU, `share_module_cuda` in weight_share_cuda.py): the first instance on a GPU
copies the storages into one cudaMalloc'd buffer, takes its CUDA IPC handle and writes it with
the index to `<key>.<gpu>.cudaipc`; the others open the handle (cudaIpcOpenMemHandle) and rebind
to views of it. The exporter owns the buffer and never frees it: it must outlive the importers
(in a Triton server all instances live as long as the server). A record whose exporter has
exited is stale; the next instance to arrive exports afresh. `share_weights` picks the path
from the model's device.

Who owns `directory`: the launcher (deploy/server.py) makes a fresh private one per server run,
hands it to the instances as $DISTSERVE_SHARED_WEIGHTS_DIR and removes it when the server stops.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENV_VAR = "DISTSERVE_SHARED_WEIGHTS_DIR"
KEY_PATTERN = re.compile(r"[0-9a-f]{16,64}")
MAGIC = b"DSWEIGHT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sQ")          # magic, length of the JSON index that follows
ALIGN = 64                              # every storage starts at a multiple of this
PAGE = mmap.PAGESIZE                    # the data region starts on a page
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # module -> its ShareInfo


class WeightShareError(RuntimeError):
    """A shared-weights file or record that does not fit this module, or cannot be used."""


@dataclass(frozen=True)
class ShareInfo:
    path: Path              # the weights file (CPU) or the IPC record (GPU)
    wrote: bool             # this process wrote it (False: attached to another's copy)
    num_bytes: int          # bytes of tensor data in the shared copy
    num_storages: int       # distinct storages (tied weights count once)
    device: str = "cpu"

    @property
    def role(self) -> str:
        return "wrote" if self.wrote else "attached"


@dataclass(frozen=True)
class Entry:
    """One named tensor of the module, as a view into one of its storages."""
    name: str               # "param:<name>" or "buffer:<name>"
    storage: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int             # bytes into its storage

    def to_list(self) -> list[Any]:
        return [self.name, self.storage, self.dtype, list(self.shape), list(self.stride), self.offset]


@dataclass(frozen=True)
class Plan:
    """The module's tensors grouped by storage, in a deterministic order."""
    entries: tuple[Entry, ...]
    tensors: tuple[torch.Tensor, ...]           # the live tensor of each entry
    storages: tuple[torch.UntypedStorage, ...]
    offsets: tuple[int, ...]                    # each storage's offset in the data region

    @property
    def num_bytes(self) -> int:
        return _align(self.offsets[-1] + self.storages[-1].nbytes()) if self.storages else 0

    def index(self, key: str) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "key": key,
                "storages": [[off, s.nbytes()] for off, s in zip(self.offsets, self.storages)],
                "tensors": [e.to_list() for e in self.entries]}


def weights_key(*parts: str) -> str:
    """A share key (32 hex chars) for these parts, e.g. checkpoint path, size, mtime, format."""
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"weights_key takes one or more strings, got {parts!r}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def checkpoint_key(path: str | Path, *parts: str) -> str:
    """weights_key of a checkpoint (a file, or a directory's top-level files: path, size,
    mtime) and `parts` (e.g. the weight format and dtype): a rewritten checkpoint gets a new key."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    stamps = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return weights_key(str(path), *stamps, *parts)


def share_weights(model: nn.Module, directory: str | Path, key: str, device: torch.device) -> ShareInfo:
    """`share_module` for a model on CPU, `share_module_cuda` for one on a GPU."""
    if device.type == "cuda":
        from backends.core.weight_share_cuda import share_module_cuda
        index = device.index if device.index is not None else torch.cuda.current_device()
        return share_module_cuda(model, directory, key, index)
    return share_module(model, directory, key)


def shared_info(model: nn.Module) -> ShareInfo | None:
    """How `model` was shared in this process, or None if it holds private weights."""
    return _SHARED.get(model)


def remember(model: nn.Module, info: ShareInfo) -> ShareInfo:
    _SHARED[model] = info
    return info


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"share key must be 16-64 lowercase hex characters (see weights_key), "
                         f"got {key!r}")
    return key


def private_dir(directory: str | Path) -> Path:
    """`directory`, created 0700 if missing; PermissionError unless it is a real directory
    owned by us and not writable by group or others."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"shared weights directory {path} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"shared weights directory {path} belongs to uid {st.st_uid}, "
                              f"not to us (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise PermissionError(f"shared weights directory {path} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}); use a private (0700) one")
    return path


# ---- the module's tensors ------------------------------------------------------------------

def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, tied ones under each of their names."""
    out = [(f"param:{n}", p) for n, p in model.named_parameters(remove_duplicate=False)]
    return out + [(f"buffer:{n}", b) for n, b in model.named_buffers(remove_duplicate=False)]


def make_plan(named: list[tuple[str, torch.Tensor]]) -> Plan:
    slots: dict[tuple[str, int], int] = {}
    storages: list[torch.UntypedStorage] = []
    entries = []
    for name, t in named:
        if t.is_quantized or t.is_sparse or t.device.type == "meta":
            raise ValueError(f"{name}: cannot share a {t.layout} {t.dtype} tensor on {t.device}")
        st = t.untyped_storage()
        slot = slots.setdefault((str(t.device), st.data_ptr()), len(storages))
        if slot == len(storages):
            storages.append(st)
        offset = t.storage_offset() * t.element_size()
        entries.append(Entry(name, slot, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                             tuple(t.stride()), offset))
    offsets, end = [], 0
    for st in storages:
        offsets.append(end)
        end = _align(end + st.nbytes())
    return Plan(tuple(entries), tuple(t for _, t in named), tuple(storages), tuple(offsets))


def check_layout(index: dict[str, Any], plan: Plan, key: str, where: Path) -> None:
    """WeightShareError unless the file's index describes exactly this module's tensors."""
    stale = f"{where} was written for another module (a stale file with the same key?)"
    if index.get("version") != FORMAT_VERSION or index.get("key") != key:
        raise WeightShareError(f"{stale}: format {index.get('version')}, key {index.get('key')!r}")
    theirs = {row[0]: row for row in index["tensors"]}
    ours = {e.name: e.to_list() for e in plan.entries}
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        raise WeightShareError(f"{stale}: tensors missing from it {missing[:5]}, "
                               f"not in this module {extra[:5]}")
    for name, row in ours.items():
        if theirs[name] != row:
            what = ("storage", "dtype", "shape", "stride", "offset")
            got = dict(zip(what, theirs[name][1:]))
            raise WeightShareError(f"{stale}: {name} is {dict(zip(what, row[1:]))} here, {got} there")
    sizes = [s.nbytes() for s in plan.storages]
    if [n for _, n in index["storages"]] != sizes:
        raise WeightShareError(f"{stale}: its storage sizes differ from this module's")


def views_of(data: torch.Tensor, plan: Plan, offsets: list[int]) -> list[torch.Tensor]:
    """Each entry's tensor as a view of `data` (uint8, 1-D), its storages at `offsets`."""
    out = []
    for e in plan.entries:
        dtype = getattr(torch, e.dtype)
        typed = data.view(dtype)
        start = typed.storage_offset() + (offsets[e.storage] + e.offset) // typed.element_size()
        try:
            out.append(typed.as_strided(e.shape, e.stride, start))
        except RuntimeError as exc:
            raise WeightShareError(f"{e.name}: does not fit the shared copy ({exc})") from None
    return out


def rebind(plan: Plan, views: list[torch.Tensor]) -> None:
    """Point every tensor at its shared view; the private storages go once unreferenced."""
    with torch.no_grad():
        for t, view in zip(plan.tensors, views):
            t.data = view


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps mid-sized frees in its arenas)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- CPU: one file, mapped read-only -------------------------------------------------------

def share_module(model: nn.Module, directory: str | Path, key: str,
                 lock_timeout_s: float = 600.0) -> ShareInfo:
    """Back `model`'s parameters and buffers (all on CPU) by one read-only shared copy.

    Args:
        model: its tensors already in final form; nothing may write them afterwards.
        directory: a private directory every instance of the deployment on this host uses.
        key: names the copy (`weights_key(...)` of the checkpoint and format).
    Returns:
        ShareInfo: the file, whether this process wrote it, its size. A module shared before
        (under any key) is left as it is, and its first ShareInfo returned.
    Raises:
        ValueError (bad key, a tensor not on CPU), PermissionError (an unsafe directory),
        WeightShareError (a file with this key that does not fit the module), TimeoutError.
    """
    check_key(key)
    if model in _SHARED:
        return _SHARED[model]
    root = private_dir(directory)
    named = named_tensors(model)
    off_cpu = [name for name, t in named if t.device.type != "cpu"]
    if off_cpu:
        raise ValueError(f"share_module shares CPU tensors; {off_cpu[:3]} are on "
                         f"{named_device(named)} (use share_module_cuda)")
    plan = make_plan(named)
    path = root / f"{key}.weights"
    with locked(root / f"{key}.lock", lock_timeout_s):
        wrote = not os.path.lexists(path)
        if wrote:
            write_weights_file(path, key, plan)
        index, data = map_weights_file(path)
    check_layout(index, plan, key, path)
    rebind(plan, views_of(data, plan, [off for off, _ in index["storages"]]))
    release_free_memory()
    return remember(model, ShareInfo(path, wrote, plan.num_bytes, len(plan.storages)))


def named_device(named: list[tuple[str, torch.Tensor]]) -> str:
    return ", ".join(sorted({str(t.device) for _, t in named}))


@contextlib.contextmanager
def locked(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600); TimeoutError after `timeout_s`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f}s for {path}: another instance "
                                       "holds it (still writing the shared weights?)") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)                     # releases the lock


def write_weights_file(path: Path, key: str, plan: Plan) -> None:
    """Header + JSON index + storages, written under a temporary name, then renamed."""
    index = json.dumps(plan.index(key), separators=(",", ":")).encode()
    data_start = _align(HEADER.size + len(index), PAGE)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(MAGIC, len(index)) + index)
            for off, st in zip(plan.offsets, plan.storages):
                f.seek(data_start + off)
                if st.nbytes():
                    f.write(memoryview(torch.empty(0, dtype=torch.uint8).set_(st).numpy()))
            f.truncate(data_start + plan.num_bytes)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WeightShareError(f"cannot write the shared weights {path} ({plan.num_bytes} bytes): "
                               f"{exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def map_weights_file(path: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(index, data region as a read-only uint8 tensor over a MAP_SHARED mapping)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} is not private to us (uid {st.st_uid}, mode "
                                  f"{stat.S_IMODE(st.st_mode):o})")
        if st.st_size < HEADER.size:
            raise WeightShareError(f"{path} is truncated ({st.st_size} bytes)")
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    magic, n = HEADER.unpack_from(mm, 0)
    if magic != MAGIC or HEADER.size + n > len(mm):
        raise WeightShareError(f"{path} is not a shared weights file (bad header)")
    index = json.loads(mm[HEADER.size:HEADER.size + n])
    data_start = _align(HEADER.size + n, PAGE)
    storages = index["storages"]
    end = _align(storages[-1][0] + storages[-1][1]) if storages else 0
    if data_start + end != len(mm):
        raise WeightShareError(f"{path} has {len(mm)} bytes; its index says {data_start + end}")
    with warnings.catch_warnings():     # "not writable": on purpose, the weights are read-only
        warnings.simplefilter("ignore", UserWarning)
        base = torch.frombuffer(mm, dtype=torch.uint8)   # keeps `mm` alive as long as any view
    return index, base[data_start:]


def _align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to
