"""The orchestrator's logic: one user request through prefill, the KV hand-off and decode.

Lifecycle: `parse()` turns the caller's inputs (plain Python values) into a `Generation`
(tokenized, chat template applied, validated) -> `run()` sends it to prefill and yields the
first token at once (TTFT) -> sends the KV descriptor to decode and relays its tokens,
detokenized incrementally, cutting at stop strings -> a final chunk with the finish reason.
If the caller cancels or a stop string hits, decode (or, before decode, the prefill lease)
is cancelled through the instance's control channel. `run_colocated()` serves the colocated
baseline the same way from one stream (a colocated instance runs both phases). Transport
(Triton BLS) is injected as callables, so this runs and is tested without Triton.
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from backends.core.messages import (Accepted, Admitted, DecodeRequest, Failed, GenerateRequest,
                                    Prefilled, PrefillRequest, Tokens, decode, encode)
from backends.core.output import RequestOutputProcessor
from backends.core.sampling import SamplingParams
from backends.core.tokenizer import Tokenizer
from backends.orchestrator.inputs import canonical, sampling_params
from deploy.contract import Timing

class RequestFailed(RuntimeError):
    """An instance answered `Failed`; `code` says what kind (e.g. "overloaded")."""

    def __init__(self, msg: Failed) -> None:
        super().__init__(msg.error)
        self.code = msg.code


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
    slo_ttft_s: float | None = None            # this request's SLOs (None: the deployment's)
    slo_tpot_s: float | None = None
    route: dict[str, Any] | None = None        # adaptive: the router's decision, for its timing
    echo: str = ""                             # the prompt, before a non-streamed output
                                               # (TRT-LLM's exclude_input_in_output false)


@dataclass
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timing: Timing | None = None


class Orchestrator:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, default_max_tokens: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens

    # -- inputs ---------------------------------------------------------------------------
    def parse(self, inputs: dict[str, Any]) -> Generation:
        """Validate and tokenize (our input names or TensorRT-LLM's: inputs.py). Raises
        ValueError naming the bad input."""
        inputs = canonical(inputs)
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
        params = sampling_params(inputs, self.tokenizer, max_tokens)
        stream = bool(inputs.get("stream", False))
        echo = not stream and not inputs.get("exclude_input_in_output", True)
        return Generation(uuid.uuid4().hex, prompt_ids, params, stream,
                          bool(inputs.get("return_token_ids", False)),
                          bool(inputs.get("return_timing", False)),
                          _slo(inputs, "slo_ttft_s"), _slo(inputs, "slo_tpot_s"),
                          echo=self.tokenizer.decode(prompt_ids) if echo else "")

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
    async def run(self, gen: Generation, prefill: CallPrefill, decode_stream: CallDecode,
                  cancel: Cancel, is_cancelled: Callable[[], bool] = lambda: False) -> AsyncIterator[Chunk]:
        """Disaggregated: prefill, the first token at once, then decode's stream."""
        out = _Output(gen, RequestOutputProcessor(self.tokenizer, gen.params.stop))
        res = decode(await prefill(encode(PrefillRequest(gen.req_id, gen.prompt_ids, gen.params))),
                     Prefilled, Failed)
        if isinstance(res, Failed):
            raise RequestFailed(res)
        t = out.timing
        t.ttft_s, t.prefill_queue_s, t.prefill_s = time.perf_counter() - out.t0, res.queue_s, res.prefill_s
        if is_cancelled():
            self._cancel_lease(res, cancel, gen.req_id)
            return
        stopped = out.add([res.first_token_id])
        if res.finished or stopped:
            if stopped:
                self._cancel_lease(res, cancel, gen.req_id)
            yield out.final("stop" if stopped else res.finish_reason)
            return
        t.first_token_at = time.monotonic()             # before decode is even asked
        if gen.stream:
            yield out.take()
        params = SamplingParams(**{**gen.params.__dict__, "seed": res.seed})
        request = DecodeRequest(gen.req_id, gen.prompt_ids, res.first_token_id, params, res.kv)
        try:
            async for chunk in self._relay(out, decode_stream(encode(request)), cancel, is_cancelled):
                yield chunk
        except Exception:
            if out.timing.kv_bytes is None:         # decode never took the KV: free the lease now
                self._cancel_lease(res, cancel, gen.req_id)
            raise

    async def run_colocated(self, gen: Generation, generate: CallDecode, cancel: Cancel,
                            is_cancelled: Callable[[], bool] = lambda: False) -> AsyncIterator[Chunk]:
        """Colocated baseline: one stream from an instance that runs both phases."""
        out = _Output(gen, RequestOutputProcessor(self.tokenizer, gen.params.stop))
        request = GenerateRequest(gen.req_id, gen.prompt_ids, gen.params)
        async for chunk in self._relay(out, generate(encode(request)), cancel, is_cancelled):
            yield chunk

    async def _relay(self, out: _Output, stream: AsyncIterator[str], cancel: Cancel,
                     is_cancelled: Callable[[], bool]) -> AsyncIterator[Chunk]:
        """Relay an instance's stream (Accepted, Admitted, Tokens..., or Failed): detokenize,
        cut at stop strings, end with the final chunk; cancel the request on the instance if a
        stop string hits or the caller cancels."""
        instance, reason = "", None
        t_first = time.perf_counter() if out.tokens else None
        async with contextlib.aclosing(stream):            # an early exit closes the stream
            async for raw in stream:
                match decode(raw, Accepted, Admitted, Tokens, Failed):
                    case Failed() as failed:
                        raise RequestFailed(failed)
                    case Accepted(instance_id=instance):
                        pass
                    case Admitted() as msg:
                        out.admitted(msg)
                    case Tokens() as msg:
                        if t_first is None:                 # colocated: the first token
                            t_first = time.perf_counter()
                            out.first_token(msg)
                        if out.add(msg.token_ids):
                            cancel(instance, out.gen.req_id)
                            reason = "stop"
                            break
                        if msg.finished:
                            reason = msg.finish_reason
                            break
                if is_cancelled():
                    cancel(instance, out.gen.req_id)
                    return
                if out.gen.stream and out.has_pending():
                    yield out.take()
        if t_first is not None:
            out.timing.tpot_s = (time.perf_counter() - t_first) / max(1, len(out.tokens) - 1)
        yield out.final(reason)

    @staticmethod
    def _cancel_lease(res: Prefilled, cancel: Cancel, req_id: str) -> None:
        if res.kv is not None:
            cancel(res.instance_id, req_id)


def _slo(inputs: dict[str, Any], name: str) -> float | None:
    value = inputs.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
        raise ValueError(f"{name} must be a number of seconds in (0, 3600), got {value!r}")
    return float(value)


class _Output:
    """One request's output so far: tokens, text not yet sent, timing."""

    def __init__(self, gen: Generation, proc: RequestOutputProcessor) -> None:
        self.gen = gen
        self.proc = proc
        self.t0 = time.perf_counter()
        self.tokens: list[int] = []
        self.pending = Chunk()
        self.timing = Timing(prompt_tokens=len(gen.prompt_ids), route=gen.route)

    def admitted(self, msg: Admitted) -> None:
        """Decode took the KV in."""
        t = self.timing
        t.kv_bytes, t.kv_transfer_s, t.decode_admitted_at = msg.kv_bytes, msg.kv_seconds, msg.admitted_at

    def first_token(self, msg: Tokens) -> None:
        """Colocated: the first token, with how the instance reached it."""
        t = self.timing
        t.ttft_s, t.first_token_at = time.perf_counter() - self.t0, time.monotonic()
        t.prefill_queue_s, t.prefill_s = msg.queue_s, msg.prefill_s

    def add(self, token_ids: list[int]) -> bool:
        """Take new tokens one by one; True if a stop string hit: the text is cut before it and
        the tokens after the one that completed it (the rest of a verified draft) are dropped."""
        for token_id in token_ids:
            delta = self.proc.feed([token_id])
            self.tokens.append(token_id)
            self.pending.text += delta.text
            self.pending.token_ids.append(token_id)
            if delta.stopped:
                return True
        return False

    def has_pending(self) -> bool:
        return bool(self.pending.text or self.pending.token_ids)

    def take(self) -> Chunk:
        chunk, self.pending = self.pending, Chunk()
        return chunk

    def final(self, reason: str | None) -> Chunk:
        """The last chunk: the rest of the text (all of it when not streaming) and the reason."""
        last = self.pending
        if reason != "stop":
            last.text += self.proc.finish().text
        if not self.gen.stream:
            last = Chunk(self.gen.echo + self.proc.text, list(self.tokens))
        self.timing.e2e_s, self.timing.output_tokens = time.perf_counter() - self.t0, len(self.tokens)
        last.finish_reason = reason or "length"
        last.timing = self.timing
        return last
