"""The orchestrator's logic: one user request through prefill, the KV hand-off and decode.

Lifecycle: `parse()` turns the caller's inputs (plain Python values) into a `Generation`
(tokenized, chat template applied, validated) -> `run()` sends it to prefill and yields the
first token at once (TTFT) -> sends the KV descriptor to decode and relays its tokens,
detokenized incrementally, cutting at stop strings -> a final chunk with the finish reason.
If the caller cancels or a stop string hits, decode (or, before decode, the prefill lease)
is cancelled through the instance's control channel. Transport (Triton BLS) is injected as
callables, so this runs and is tested without Triton.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from backends.core.messages import (DecodeOutput, DecodeRequest, PrefillRequest, PrefillResult)
from backends.core.output import RequestOutputProcessor
from backends.core.sampling import SamplingParams
from backends.core.tokenizer import Tokenizer

CallPrefill = Callable[[str], Awaitable[str]]
CallDecode = Callable[[str], AsyncIterator[str]]
Cancel = Callable[[str, str], None]            # (instance_id, req_id)


@dataclass(frozen=True)
class Generation:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = True
    return_token_ids: bool = False
    return_timing: bool = False


@dataclass
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timing: dict[str, Any] | None = None


class Orchestrator:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, default_max_tokens: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens

    # -- inputs ---------------------------------------------------------------------------
    def parse(self, inputs: dict[str, Any]) -> Generation:
        """Validate and tokenize. Raises ValueError naming the bad input."""
        prompt_ids = self._prompt_ids(inputs)
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is "
                             f"{self.max_model_len}")
        max_tokens = inputs.get("max_tokens", min(self.default_max_tokens, room))
        if isinstance(max_tokens, int) and max_tokens > room:
            raise ValueError(f"max_tokens {max_tokens} is too large: the prompt has "
                             f"{len(prompt_ids)} tokens and the context length is "
                             f"{self.max_model_len}, so at most {room} can be generated")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=inputs.get("temperature", 0.0),
            top_p=inputs.get("top_p", 1.0), top_k=inputs.get("top_k", 0),
            seed=inputs.get("seed"), stop=tuple(inputs.get("stop", ())),
            ignore_eos=bool(inputs.get("ignore_eos", False))).with_seed()
        return Generation(uuid.uuid4().hex, prompt_ids, params, bool(inputs.get("stream", False)),
                          bool(inputs.get("return_token_ids", False)),
                          bool(inputs.get("return_timing", False)))

    def _prompt_ids(self, inputs: dict[str, Any]) -> list[int]:
        given = [k for k in ("text_input", "messages", "input_ids") if k in inputs]
        if len(given) != 1:
            raise ValueError("give exactly one of text_input, messages or input_ids "
                             f"(got {given or 'none'})")
        if "input_ids" in inputs:
            ids = list(inputs["input_ids"])
            if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise ValueError(f"input_ids must be in [0, {self.tokenizer.vocab_size})")
        elif "messages" in inputs:
            try:
                messages = json.loads(inputs["messages"])
            except json.JSONDecodeError as e:
                raise ValueError(f"messages is not valid JSON: {e}") from None
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(inputs["text_input"])
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    # -- the request ----------------------------------------------------------------------
    async def run(self, gen: Generation, prefill: CallPrefill, decode: CallDecode, cancel: Cancel,
                  is_cancelled: Callable[[], bool] = lambda: False) -> AsyncIterator[Chunk]:
        t0 = time.perf_counter()
        timing: dict[str, Any] = {}
        proc = RequestOutputProcessor(self.tokenizer, gen.params.stop)
        res = PrefillResult.from_json(await prefill(PrefillRequest(gen.req_id, gen.prompt_ids,
                                                                   gen.params).to_json()))
        timing.update(ttft_s=time.perf_counter() - t0, prefill_queue_s=res.queue_s,
                      prefill_s=res.prefill_s, prompt_tokens=len(gen.prompt_ids))
        if is_cancelled():
            self._cancel_lease(res, cancel, gen.req_id)
            return
        tokens = [res.first_token_id]
        delta = proc.feed(tokens)
        if res.finished or delta.stopped:
            if delta.stopped:
                self._cancel_lease(res, cancel, gen.req_id)
            yield self._final(gen, proc, Chunk(delta.text, list(tokens)), tokens,
                              "stop" if delta.stopped else res.finish_reason, timing, t0)
            return
        pending = Chunk(delta.text, list(tokens))
        timing["first_token_at"] = time.monotonic()   # before decode is even asked
        if gen.stream:
            yield pending
            pending = Chunk()
        params = SamplingParams(**{**gen.params.__dict__, "seed": res.seed})
        request = DecodeRequest(gen.req_id, gen.prompt_ids, res.first_token_id, params, res.kv)
        instance, reason, t_first = "", None, time.perf_counter()
        async for raw in decode(request.to_json()):
            out = DecodeOutput.from_json(raw)
            if out.error:
                raise RuntimeError(out.error)
            instance = out.instance_id or instance
            if out.kv_bytes:
                timing.update(kv_bytes=out.kv_bytes, kv_transfer_s=out.kv_seconds,
                              decode_admitted_at=out.admitted_at)
            tokens += out.token_ids
            delta = proc.feed(out.token_ids) if out.token_ids else None
            if delta is not None:
                pending.text += delta.text
                pending.token_ids += out.token_ids
            if delta is not None and delta.stopped:
                cancel(instance, gen.req_id)
                reason = "stop"
                break
            if is_cancelled():
                cancel(instance, gen.req_id)
                return
            if out.finished:
                reason = out.finish_reason
                break
            if gen.stream and (pending.text or pending.token_ids):
                yield pending
                pending = Chunk()
        timing["tpot_s"] = (time.perf_counter() - t_first) / max(1, len(tokens) - 1)
        yield self._final(gen, proc, pending, tokens, reason, timing, t0)

    def _final(self, gen: Generation, proc: RequestOutputProcessor, last: Chunk, tokens: list[int],
               reason: str | None, timing: dict[str, Any], t0: float) -> Chunk:
        """The last chunk: the rest of the text (all of it when not streaming) and the reason."""
        if reason != "stop":
            last.text += proc.finish().text
        if not gen.stream:
            last = Chunk(proc.text, list(tokens))
        timing.update(e2e_s=time.perf_counter() - t0, output_tokens=len(tokens))
        last.finish_reason = reason or "length"
        last.timing = timing
        return last

    @staticmethod
    def _cancel_lease(res: PrefillResult, cancel: Cancel, req_id: str) -> None:
        if res.kv is not None:
            cancel(res.instance_id, req_id)
