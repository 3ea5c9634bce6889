"""Turning a request's token stream into text: incremental detokenization and stop strings.

Lives at the front end (the offline LLM, the Triton orchestrator), as in vLLM v1: engines deal
in token ids only; when a stop string appears the front end aborts the request in its engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from backends.core.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class TextDelta:
    text: str
    stopped: bool           # a stop string was hit: the request should end now


class RequestOutputProcessor:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop) if stop else None
        self.text = ""

    def feed(self, token_ids: list[int]) -> TextDelta:
        return self._out(self._detok.step(token_ids))

    def finish(self) -> TextDelta:
        """At end of stream: release held-back text."""
        delta = self._out(self._detok.flush())
        if self._stop is not None and not self._stop.stopped:
            tail = self._stop.flush()
            self.text += tail
            delta.text += tail
        return delta

    def _out(self, text: str) -> TextDelta:
        if self._stop is not None:
            text = self._stop.feed(text)
        self.text += text
        return TextDelta(text, self._stop is not None and self._stop.stopped)
