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


def iter_sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """The data of each event, in order. `lines` may be the raw lines of an HTTP response."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:                               # blank line: dispatch the event, if any
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):                   # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
    if data:
        yield "\n".join(data)


def parse_event(data: str) -> dict[str, Any]:
    """An event's data as a JSON object; raises DistServeError on an error payload."""
    try:
        event = json.loads(data)
    except ValueError:
        raise DistServeError(f"malformed event from Triton: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise DistServeError(f"unexpected event from Triton: {data[:200]!r}")
    if "error" in event:
        raise DistServeError(str(event["error"]))
    return event


def iter_sse_events(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """Each non-empty event as a JSON object (raises DistServeError on an error event)."""
    for data in iter_sse_data(lines):
        if data.strip():
            yield parse_event(data)
