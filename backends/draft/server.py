"""The drafter process: a Drafter (backends.core.spec_decode.DRAFTERS) on cores of its own,
proposing for each sequence as soon as it hears of new tokens. Started by RemoteDrafter
(client.py) with its end of a socket pair:

    python -m backends.draft.server --fd 3 --method ngram --num-draft 6 --vocab-size 49152 \
        [--cores 0] [--max-len 2048] [--options '{}'] [--parent PID]

Lifecycle: die with the parent (PR_SET_PDEATHSIG, then a check that it is still there), pin to
`--cores` before torch starts any thread (torch threads = their count), build the drafter
(`--options`: JSON keywords of its constructor, for a drafter that needs them), send READY; then
until EOF: block for input, take everything already queued behind it, apply the frames in order
(DraftServer), propose once per sequence whose tokens changed, at its new end, and send the
proposals. Exits 0 on EOF (the client closed or died), 2 on a malformed frame.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable

from backends.draft.protocol import MAX_SCORE, TO_DRAFTER, Frame, FrameReader, Kind, ProtocolError

MAX_SEQUENCES = 1 << 16           # histories held at once (the client drops what leaves)
MAX_READ_BYTES = 4 << 20          # input taken per round before proposing
PR_SET_PDEATHSIG = 1


class DraftServer:
    """Each live sequence's token history and the proposals they get: `handle(frames)` applies
    client frames and returns the frames to send back. Pure: no socket, no clock."""

    def __init__(self, drafter, num_draft: int, max_len: int) -> None:
        self.drafter = drafter
        self.num_draft = num_draft
        self.max_len = max_len
        self.histories: dict[int, list[int]] = {}
        from backends.core.spec_decode import KeyedDrafts   # here: torch loads after the core pinning
        self._drafts = KeyedDrafts(drafter)      # scored (the n-gram's match length), with its state
        self._changed: dict[int, None] = {}          # this round's updated sequences, in order
        self._handlers: dict[Kind, Callable[[Frame], Frame | None]] = {
            Kind.RESET: self._reset, Kind.APPEND: self._append, Kind.DROP: self._drop,
            Kind.PING: self._ping}

    def handle(self, frames: list[Frame]) -> list[Frame]:
        self._changed = {}
        out = [reply for f in frames if (reply := self._handlers[f.kind](f)) is not None]
        if len(self.histories) > MAX_SEQUENCES:
            raise ProtocolError(f"more than {MAX_SEQUENCES} sequences at once")
        sids = list(self._changed)
        histories = [self.histories[sid] for sid in sids]
        for sid, history, (draft, score) in zip(sids, histories,
                                                 self._drafts.propose_many(sids, histories, self.num_draft)):
            out.append(Frame(Kind.PROPOSAL, sid, len(history), list(draft[:self.num_draft]),
                             min(score, MAX_SCORE) if draft else 0))
        return out

    def _reset(self, f: Frame) -> None:
        self.histories[f.sid] = list(f.tokens)
        self._drafts.forget(f.sid)
        self._changed[f.sid] = None

    def _append(self, f: Frame) -> None:
        history = self.histories.get(f.sid)
        if history is None or f.base != len(history):
            raise ProtocolError(f"APPEND to sequence {f.sid} at {f.base}, but it holds "
                                f"{'none' if history is None else len(history)}")
        if len(history) + len(f.tokens) > self.max_len:
            raise ProtocolError(f"sequence {f.sid} grows past {self.max_len} tokens")
        history += f.tokens
        self._changed[f.sid] = None

    def _drop(self, f: Frame) -> None:
        history = self.histories.pop(f.sid, None)
        self._changed.pop(f.sid, None)
        self._drafts.forget(f.sid)
        if history is not None and (done := getattr(self.drafter, "done", None)) is not None:
            done(history)                 # a drafter that learns from finished text

    def _ping(self, f: Frame) -> Frame:
        return Frame(Kind.PONG, base=len(self.histories))


def serve(sock: socket.socket, server: DraftServer, vocab_size: int) -> None:
    """READY, then frames in, proposals out, until EOF. ProtocolError on a malformed frame."""
    reader = FrameReader(TO_DRAFTER, server.max_len, vocab_size)
    sock.sendall(Frame(Kind.READY, base=os.getpid()).encode())
    while data := _read(sock):
        replies = server.handle(reader.feed(data))
        if replies:
            sock.sendall(b"".join(f.encode() for f in replies))


def _read(sock: socket.socket) -> bytes:
    """Block for input, then take what is already queued behind it (b"": EOF)."""
    data = sock.recv(1 << 16)
    chunks = [data]
    while data and sum(map(len, chunks)) < MAX_READ_BYTES:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        chunks.append(data)
    return b"".join(chunks)


def _die_with_parent(parent: int | None) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:      # it died before the prctl
        sys.exit(0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backends.draft.server", description=__doc__.split("\n")[0])
    p.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    p.add_argument("--method", required=True, help="a drafter of backends.core.spec_decode.DRAFTERS")
    p.add_argument("--num-draft", type=int, required=True, help="tokens per proposal")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--max-len", type=int, default=1 << 20, help="the most tokens of one sequence")
    p.add_argument("--cores", default="", help="comma-separated core ids to pin to")
    p.add_argument("--options", default="{}", help="JSON keywords of the drafter's constructor")
    p.add_argument("--parent", type=int, default=None, help="exit if this pid is not the parent")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # the client decides when it ends
    _die_with_parent(args.parent)
    cores = [int(c) for c in args.cores.split(",") if c]
    if cores:
        os.sched_setaffinity(0, cores)                     # before torch starts its threads
    import torch

    from backends.core.spec_decode import DRAFTERS
    torch.set_num_threads(len(cores) or 1)
    drafter = DRAFTERS[args.method](**json.loads(args.options))
    sock = socket.socket(fileno=args.fd)
    try:
        serve(sock, DraftServer(drafter, args.num_draft, args.max_len), args.vocab_size)
    except ProtocolError as e:
        print(f"drafter {os.getpid()}: malformed input, exiting: {e}", file=sys.stderr)
        return 2
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
