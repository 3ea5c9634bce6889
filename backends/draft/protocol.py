"""The drafter process's wire format: length-prefixed binary frames over a private socket pair.

Every frame is a 16-byte header, little-endian `kind: u8, pad: 1, score: u16, sid: u32, base: u32,
n: u32`, then `n` int32 token ids. `sid` names one sequence (the client's number for it, never reused),
`base` is a length in that sequence's tokens. No pickle, no JSON: a reader checks the kind
against the ones its side may receive, `n` against its bound, every token against [0, vocab)
and the fields a kind leaves unused against 0, and raises ProtocolError on anything else.

To the drafter:
- RESET(sid, tokens): the sequence's whole history (it replaces any the drafter holds).
- APPEND(sid, base, tokens): its tokens from position `base` on (`base` = what the drafter
  holds: anything else is a protocol error).
- DROP(sid): the sequence left.
- PING: answer with PONG.
From the drafter:
- READY(base = its pid): initialized, proposing from now on.
- PROPOSAL(sid, base, tokens, score): a draft to follow the sequence's first `base` tokens, and the
  drafter's confidence in it (the n-gram's match length; 0 from a drafter that does not score).
  Every other frame's score is 0.
- PONG(base = the sequences it holds).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import numpy as np

HEADER = struct.Struct("<BxHIII")
MAX_SCORE = (1 << 16) - 1
TOKEN = np.dtype("<i4")
MAX_SID = (1 << 32) - 1


class ProtocolError(ValueError):
    """A malformed frame: the peer is not to be trusted any more."""


class Kind(enum.IntEnum):
    RESET = 1
    APPEND = 2
    DROP = 3
    PING = 4
    READY = 16
    PROPOSAL = 17
    PONG = 18


TO_DRAFTER = frozenset({Kind.RESET, Kind.APPEND, Kind.DROP, Kind.PING})
FROM_DRAFTER = frozenset({Kind.READY, Kind.PROPOSAL, Kind.PONG})
_WITH_TOKENS = frozenset({Kind.RESET, Kind.APPEND, Kind.PROPOSAL})
_WITH_SID = _WITH_TOKENS | {Kind.DROP}
_WITH_BASE = frozenset({Kind.APPEND, Kind.PROPOSAL, Kind.READY, Kind.PONG})


@dataclass(frozen=True)
class Frame:
    kind: Kind
    sid: int = 0
    base: int = 0
    tokens: list[int] = field(default_factory=list)
    score: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(self.kind, self.score, self.sid, self.base, len(self.tokens)) + \
            np.asarray(self.tokens, dtype=TOKEN).tobytes()


class FrameReader:
    """Frames out of a byte stream, validated; keeps a partial frame until its rest arrives.

    Args:
        kinds: the kinds this side may receive (TO_DRAFTER or FROM_DRAFTER).
        max_tokens: the most tokens one frame may carry.
        vocab_size: token ids must lie in [0, vocab_size).
    """

    def __init__(self, kinds: frozenset[Kind], max_tokens: int, vocab_size: int) -> None:
        self.kinds = kinds
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The whole frames that `data` completes. ProtocolError if any is malformed."""
        self._buf += data
        frames, pos = [], 0
        while len(self._buf) - pos >= HEADER.size:
            kind, score, sid, base, n = HEADER.unpack_from(self._buf, pos)
            self._check_header(kind, sid, base, n)
            if score and kind != Kind.PROPOSAL:
                raise ProtocolError(f"{Kind(kind).name}: a score ({score}) on a frame that has none")
            end = pos + HEADER.size + n * TOKEN.itemsize
            if len(self._buf) < end:
                break
            tokens = np.frombuffer(bytes(self._buf[pos + HEADER.size:end]), TOKEN)
            if n and not (tokens.min() >= 0 and tokens.max() < self.vocab_size):
                raise ProtocolError(f"{Kind(kind).name}: a token id outside [0, {self.vocab_size})")
            frames.append(Frame(Kind(kind), sid, base, tokens.tolist(), score))
            pos = end
        del self._buf[:pos]
        return frames

    def _check_header(self, kind: int, sid: int, base: int, n: int) -> None:
        if kind not in self.kinds:
            raise ProtocolError(f"unexpected frame kind {kind}")
        kind = Kind(kind)
        if n > (self.max_tokens if kind in _WITH_TOKENS else 0):
            raise ProtocolError(f"{kind.name} carries {n} tokens (at most "
                                f"{self.max_tokens if kind in _WITH_TOKENS else 0})")
        if (kind in _WITH_SID) != (sid != 0) or (kind not in _WITH_BASE and base):
            raise ProtocolError(f"{kind.name}: bad sid {sid} or base {base}")
