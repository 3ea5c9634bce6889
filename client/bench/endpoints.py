"""Where the benchmark sends requests: one streaming request -> an async stream of StreamEvents.

Each endpoint asks for exactly `output_len` tokens (`ignore_eos`) of a prompt given as token
ids, and reports, per response, how many new tokens it carried:
- triton-http: POST /v2/models/<model>/generate_stream, {"input_ids": [...], "max_tokens": n,
  "ignore_eos": true, "stream": true, "return_token_ids": true, "return_timing": true}; SSE
  `data: {...}` lines; tokens counted from `token_ids` (a one-element output comes back as a
  JSON scalar); the server's `timing` breakdown is kept.
- triton-grpc: a ModelStreamInfer stream per request on one shared channel, the same inputs
  as tensors, by the SDK's own streamer (client.grpc_stream.GrpcChannel): ends at the response
  flagged `triton_final_response` or at an error; leaving early cancels the request.
Both Triton endpoints turn each response into a client.results.Chunk, then a StreamEvent by
`chunk_event`.
- openai: POST <url>/v1/completions {"model", "prompt": [ids], "max_tokens", "ignore_eos",
  "stream": true, "stream_options": {"include_usage": true}}; SSE `data: ` lines until
  `[DONE]`. Each chunk with text is one token (vLLM and llama.cpp stream one token per chunk);
  a final `usage.completion_tokens`, when sent, replaces the count.
Error payloads (`{"error": ...}`, non-200 answers, gRPC errors) raise DistServeError.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from client.grpc_stream import GrpcChannel
from client.request import build_inputs, http_body
from client.results import Chunk, DistServeError, chunk_from_json
from client.sse import SSEDecoder, json_object, parse_event
from deploy.contract import Timing

from .pools import Request


@dataclass(frozen=True)
class StreamEvent:
    num_tokens: int                      # new tokens in this response
    finish_reason: str | None = None
    total_tokens: int | None = None      # the server's own count of all output tokens (usage)
    timing: Timing | None = None         # the server's latency breakdown (Triton, last response)


def chunk_event(chunk: Chunk) -> StreamEvent:
    """One Triton response, from either protocol. Tokens are counted by id (every request
    asks for return_token_ids); text without ids counts as one."""
    return StreamEvent(len(chunk.token_ids) or int(bool(chunk.text)), chunk.finish_reason,
                       timing=chunk.timing)


def triton_event(data: str) -> StreamEvent:
    """One `generate_stream` event; raises DistServeError on an error payload."""
    return chunk_event(chunk_from_json(parse_event(data)))


def openai_event(data: str) -> StreamEvent | None:
    """One /v1/completions stream chunk; None for `[DONE]`; raises DistServeError on an error."""
    if data.strip() == "[DONE]":
        return None
    event = json_object(data)
    if event.get("error") is not None:
        raise DistServeError(_error_message(event["error"]))
    choice = (event.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    num_tokens = len(tokens) if tokens else int(bool(choice.get("text")))
    usage = event.get("usage") or {}
    return StreamEvent(num_tokens, choice.get("finish_reason"), usage.get("completion_tokens"))


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def triton_inputs(req: Request) -> dict[str, Any]:
    """What both Triton endpoints send: exactly output_len tokens of the prompt's ids."""
    return build_inputs(input_ids=list(req.prompt_ids), max_tokens=req.output_len,
                        ignore_eos=True, return_token_ids=True, return_timing=True, stream=True)


def http_error(status: int, body: str) -> DistServeError:
    """A non-200 answer: the server's {"error": ...} message if there is one."""
    try:
        message = _error_message(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:300]
    return DistServeError(f"HTTP {status}: {message}", status=status)


def base_url(url: str, suffix: str = "") -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[: -len(suffix)] if suffix and url.endswith(suffix) else url


class Endpoint:
    """`async with endpoint:` opens its connections; `stream(req)` runs one request."""
    name = ""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    def stream(self, req: Request) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError


class _HttpEndpoint(Endpoint):
    async def __aenter__(self) -> Endpoint:
        import aiohttp
        # No connection limit: the client must not queue requests the server should see.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None),
                                              read_bufsize=1 << 20)      # long SSE lines
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._session.close()

    async def _sse(self, path: str, body: bytes, parse: Any) -> AsyncIterator[StreamEvent]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with self._session.post(path, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise http_error(resp.status, await resp.text(errors="replace"))
            decoder = SSEDecoder()
            async for line in resp.content:
                data = decoder.feed(line)
                if data is not None and data.strip():
                    event = parse(data)
                    if event is None:
                        return
                    yield event
            data = decoder.flush()
            if data is not None and data.strip():
                event = parse(data)
                if event is not None:
                    yield event


class TritonHttp(_HttpEndpoint):
    name = "triton-http"

    def stream(self, req: Request) -> AsyncIterator[StreamEvent]:
        path = f"{base_url(self.url)}/v2/models/{self.model}/generate_stream"
        return self._sse(path, http_body(triton_inputs(req)), triton_event)


class OpenAICompletions(_HttpEndpoint):
    name = "openai"

    def stream(self, req: Request) -> AsyncIterator[StreamEvent]:
        body = {"model": self.model, "prompt": list(req.prompt_ids), "max_tokens": req.output_len,
                "ignore_eos": True, "stream": True, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        path = f"{base_url(self.url, '/v1')}/v1/completions"
        return self._sse(path, json.dumps(body).encode(), openai_event)


class TritonGrpc(Endpoint):
    name = "triton-grpc"

    async def __aenter__(self) -> Endpoint:
        self._channel = GrpcChannel(self.url)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._channel.close()

    async def stream(self, req: Request) -> AsyncIterator[StreamEvent]:
        # No per-response timeout: the runner bounds the whole request.
        async for chunk in self._channel.stream(self.model, triton_inputs(req)):
            yield chunk_event(chunk)


ENDPOINTS: dict[str, type[Endpoint]] = {e.name: e for e in (TritonHttp, TritonGrpc, OpenAICompletions)}


def make_endpoint(name: str, url: str, model: str) -> Endpoint:
    if name not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {name!r}; choose one of {sorted(ENDPOINTS)}")
    return ENDPOINTS[name](url, model)
