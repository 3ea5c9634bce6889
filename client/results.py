"""What the SDK hands back: `Chunk` (one streamed response), `Completion` (a whole request),
`DistServeError` (anything that went wrong, with the server's message), and the conversion of
the server's outputs, from either protocol, into a `Chunk`: one path (`_chunk`) for the JSON of
HTTP and the tensors of gRPC, and one for the `timing` output (a deploy.contract.Timing).

Triton's HTTP `generate` endpoints write a one-element output as a JSON scalar and any other
output as a JSON array; the converters accept both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy.contract import FINISH_REASON, TEXT_OUTPUT, TIMING, TOKEN_IDS, Timing

OUTPUTS = (TEXT_OUTPUT, TOKEN_IDS, FINISH_REASON, TIMING)     # what a Chunk is made of


class DistServeError(Exception):
    """A request failed: the server's error message, or why Triton could not be reached.

    `status` is the HTTP status code, the gRPC status name, "unreachable" or "timeout",
    when known.
    """

    def __init__(self, message: str, status: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Chunk:
    text: str = ""                                     # new text since the previous chunk
    token_ids: list[int] = field(default_factory=list)  # new token ids (with return_token_ids)
    finish_reason: str | None = None                   # on the last chunk only
    timing: Timing | None = None                       # server timing (return_timing, last chunk)

    @property
    def has_tokens(self) -> bool:
        return bool(self.text or self.token_ids)


@dataclass(frozen=True)
class Completion:
    """A whole request. Client-measured times are in seconds (see client.timer for their
    definitions); `timing` is what the server reported, when return_timing was set."""
    text: str
    token_ids: list[int]
    finish_reason: str | None          # None when the stream ended without one (cancelled)
    timing: Timing | None
    ttft_s: float | None
    e2e_s: float
    tpot_s: float | None = None        # only for streamed requests with >= 2 token chunks
    num_chunks: int = 1


def chunk_from_json(event: dict[str, Any]) -> Chunk:
    """One `generate` / `generate_stream` JSON document -> Chunk; raises on {"error": ...}."""
    if not isinstance(event, dict):
        raise DistServeError(f"unexpected response from Triton: {event!r}")
    if "error" in event:
        raise DistServeError(str(event["error"]))
    return _chunk(*(event.get(name) for name in OUTPUTS))


def chunk_from_arrays(outputs: dict[str, Any]) -> Chunk:
    """Output name -> numpy array (None when absent), as tritonclient's as_numpy gives -> Chunk."""
    return _chunk(*(_plain(outputs.get(name)) for name in OUTPUTS))


def _chunk(text: Any, token_ids: Any, reason: Any, timing: Any) -> Chunk:
    """The outputs as plain values, each a scalar, a list or None (absent)."""
    return Chunk(text="".join(str(t) for t in _list(text)),
                 token_ids=[int(t) for t in _list(token_ids)],       # (a lone id may be 0)
                 finish_reason=_first(reason), timing=_timing(_first(timing)))


def _plain(array: Any) -> list[Any] | None:
    """A numpy output as a flat list, BYTES elements decoded."""
    if array is None:
        return None
    return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x
            for x in array.reshape(-1).tolist()]


def _list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _first(value: Any) -> Any:
    values = _list(value)
    return values[0] if values else None


def _timing(value: Any) -> Timing | None:
    """The `timing` output (its JSON text, or that text parsed) as a Timing."""
    if value is None:
        return None
    if not isinstance(value, dict):
        try:
            value = json.loads(value)
        except (TypeError, ValueError):
            raise DistServeError(f"server sent timing that is not JSON: {value!r}") from None
    try:
        return Timing.from_dict(value)
    except ValueError as e:
        raise DistServeError(f"server sent malformed timing: {e}") from None


def unreachable(url: str, reason: str) -> DistServeError:
    """The error for "nothing answers at `url`", with a hint at how to start the server."""
    return DistServeError(f"cannot reach Triton at {url}: {reason} — is ./build.sh serve running?",
                          status="unreachable")
