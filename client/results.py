"""What the SDK hands back: `Chunk` (one streamed response), `Completion` (a whole request),
`DistServeError` (anything that went wrong, with the server's message), and the conversion of
the server's outputs, from either protocol, into a `Chunk`.

Triton's HTTP `generate` endpoints write a one-element output as a JSON scalar and any other
output as a JSON array; the converters accept both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy.contract import FINISH_REASON, TEXT_OUTPUT, TIMING, TOKEN_IDS


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
    timing: dict[str, Any] | None = None               # server timing (return_timing, last chunk)

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
    timing: dict[str, Any] | None
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
    text = event.get(TEXT_OUTPUT) or ""
    token_ids = event.get(TOKEN_IDS)
    token_ids = [] if token_ids is None else token_ids       # (a lone id may be 0)
    reason = event.get(FINISH_REASON)
    timing = event.get(TIMING)
    return Chunk(
        text="".join(text) if isinstance(text, list) else str(text),
        token_ids=[int(t) for t in token_ids] if isinstance(token_ids, list) else [int(token_ids)],
        finish_reason=_first(reason),
        timing=_timing(_first(timing)))


def chunk_from_arrays(outputs: dict[str, Any]) -> Chunk:
    """Output name -> numpy array (None when absent), as tritonclient's as_numpy gives -> Chunk."""
    text, token_ids = outputs.get(TEXT_OUTPUT), outputs.get(TOKEN_IDS)
    reason, timing = outputs.get(FINISH_REASON), outputs.get(TIMING)
    return Chunk(
        text="" if text is None else "".join(_str(x) for x in text.reshape(-1)),
        token_ids=[] if token_ids is None else [int(t) for t in token_ids.reshape(-1)],
        finish_reason=None if reason is None or reason.size == 0 else _str(reason.reshape(-1)[0]),
        timing=None if timing is None or timing.size == 0 else _timing(_str(timing.reshape(-1)[0])))


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _timing(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        timing = json.loads(value)
    except (TypeError, ValueError):
        raise DistServeError(f"server sent timing that is not JSON: {value!r}") from None
    if not isinstance(timing, dict):
        raise DistServeError(f"server sent timing that is not a JSON object: {value!r}")
    return timing


def unreachable(url: str, reason: str) -> DistServeError:
    """The error for "nothing answers at `url`", with a hint at how to start the server."""
    return DistServeError(f"cannot reach Triton at {url}: {reason} — is ./build.sh serve running?",
                          status="unreachable")
