"""The JSON OpenAI clients expect: whole responses, stream chunks, usage, server-sent events.

One `Shape` per endpoint says how its objects look; `Completions` and `Chat` differ only in
their object names and where the text goes (`text` / `message` / `delta`). A stream is
`opening()` (chat: the assistant role), one `delta(text)` per new piece, `delta("", reason)` at
the end, then with stream_options.include_usage a chunk with no choices and the usage (every
chunk then carries `"usage": null`, as OpenAI's do), then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from deploy.contract import Timing

DONE = b"data: [DONE]\n\n"


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


def usage(timing: Timing | None) -> dict[str, int] | None:
    """prompt / completion / total tokens, from the server's timing of the request."""
    if timing is None or timing.prompt_tokens is None or timing.output_tokens is None:
        return None
    return {"prompt_tokens": timing.prompt_tokens, "completion_tokens": timing.output_tokens,
            "total_tokens": timing.prompt_tokens + timing.output_tokens}


class Shape:
    """The objects of one response: its id, creation time and model name, on every object."""
    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def whole(self, text: str, finish_reason: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
        """The non-streaming response."""
        choice = {"index": 0, **self._whole_choice(text), "logprobs": None,
                  "finish_reason": finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": usage}

    def opening(self) -> list[dict[str, Any]]:
        """The chunks a stream starts with, before any text."""
        return []

    def delta(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, **self._delta_choice(text), "logprobs": None,
                  "finish_reason": finish_reason}
        return self._chunk([choice])

    def usage_chunk(self, usage: dict[str, int] | None) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head(self.chunk_object), "choices": choices}
        return {**chunk, "usage": None} if self.include_usage else chunk

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def _delta_choice(self, text: str) -> dict[str, Any]:
        raise NotImplementedError


class Completions(Shape):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return {"text": text}

    _delta_choice = _whole_choice


class Chat(Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening(self) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [self._chunk([choice])]

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def _delta_choice(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text} if text else {}}
