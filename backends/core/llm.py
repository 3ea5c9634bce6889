"""Offline use of one engine: text in, text out (the developer's CLI and tests use this)."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.output import RequestOutputProcessor
from backends.core.sampling import SamplingParams, resolve_eos
from backends.core.sequence import FinishReason
from backends.core.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


class LLM:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_path(cls, path: str, engine_config: EngineConfig = EngineConfig()) -> LLM:
        tokenizer = Tokenizer.load(path)
        engine = LLMEngine.from_path(path, engine_config,
                                     eos_token_ids=tuple(sorted(tokenizer.stop_token_ids)))
        return cls(engine, tokenizer)

    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages),
                                         add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: list[str], params: SamplingParams, chat: bool = False) -> list[Completion]:
        """Run all prompts as one continuously batched workload; results in prompt order."""
        params = resolve_eos(params, self.engine.eos_token_ids)       # min_tokens bans the EOS
        procs: dict[str, RequestOutputProcessor] = {}
        tokens: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        order = []
        for prompt in prompts:
            req_id = f"gen-{next(self._ids)}"
            self.engine.add_request(req_id, self.encode_prompt(prompt, chat), params)
            procs[req_id], tokens[req_id] = RequestOutputProcessor(self.tokenizer, params.stop), []
            order.append(req_id)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                tokens[out.req_id] += out.new_token_ids
                if procs[out.req_id].feed(out.new_token_ids).stopped:
                    self.engine.abort(out.req_id)
                    reasons[out.req_id] = FinishReason.STOP.value
                elif out.finished:
                    procs[out.req_id].finish()
                    reasons[out.req_id] = out.finish_reason.value
        return [Completion(procs[r].text, tokens[r], reasons[r]) for r in order]

    def stream(self, prompt: str | list[dict], params: SamplingParams, chat: bool = False) -> Iterator[str]:
        """Yield text deltas of one request as they are generated."""
        params = resolve_eos(params, self.engine.eos_token_ids)
        req_id = f"stream-{next(self._ids)}"
        self.engine.add_request(req_id, self.encode_prompt(prompt, chat), params)
        proc = RequestOutputProcessor(self.tokenizer, params.stop)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.req_id != req_id:
                        continue
                    delta = proc.feed(out.new_token_ids)
                    if delta.text:
                        yield delta.text
                    if delta.stopped:
                        return
                    if out.finished:
                        tail = proc.finish().text
                        if tail:
                            yield tail
                        return
        finally:
            self.engine.abort(req_id)
