"""Server-sent events, as Triton's `generate_stream` writes them.

Triton sends one `data: {...}` line per response, then a blank line. The parser follows the
SSE rules far enough to be robust to what proxies and future servers may do: `data:` with or
without the space, one event's data split over several `data:` lines (joined with "\n"),
comment / keep-alive lines starting with ":", `event:` / `id:` / `retry:` fields (ignored),
CRLF line ends, and a last event without its blank line at the end of the stream.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from .results import DistServeError


class SSEDecoder:
    """The parser, one line at a time (for async streams): `feed` returns an event's data
    when a blank line ends it; `flush` the last event's, if the stream ended without one."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, raw: bytes | str) -> str | None:
        line = (raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if not line:                               # blank line: dispatch the event, if any
            return self.flush()
        if line.startswith(":"):                   # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        data, self._data = self._data, []
        return "\n".join(data) if data else None


def iter_sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """The data of each event, in order. `lines` may be the raw lines of an HTTP response."""
    decoder = SSEDecoder()
    for raw in lines:
        data = decoder.feed(raw)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


def json_object(data: str) -> dict[str, Any]:
    """An event's data as a JSON object; DistServeError if it is not one."""
    try:
        event = json.loads(data)
    except ValueError:
        raise DistServeError(f"malformed event: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise DistServeError(f"unexpected event: {data[:200]!r}")
    return event


def parse_event(data: str) -> dict[str, Any]:
    """A Triton event's data as a JSON object; raises DistServeError on an error payload."""
    event = json_object(data)
    if "error" in event:
        raise DistServeError(str(event["error"]))
    return event


def iter_sse_events(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """Each non-empty event as a JSON object (raises DistServeError on an error event)."""
    for data in iter_sse_data(lines):
        if data.strip():
            yield parse_event(data)
