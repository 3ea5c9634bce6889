"""The OpenAI-compatible HTTP API over a Backend (Triton's `distserve` model): an ASGI app.

    GET  /v1/models, /v1/models/{model}      the one served model
    POST /v1/completions                     prompt -> text
    POST /v1/chat/completions                messages (the model's chat template) -> text
    GET  /health                             200 when Triton reports the model ready, else 503

A request: parse (frontend.parse; a bad field is a 400 naming it) -> open the model's stream ->
wait for its first response while watching the client (so a refusal, e.g. a prompt over the
context length or an overloaded server, still gets its own status code, and a client that
leaves while the request queues cancels it) -> stream server-sent events (frontend.shapes), or
collect the whole text. When the client goes away, the model's stream is closed: Triton cancels
the request and the engines free its KV. Errors mid-stream become a last `data: {"error": ...}`
event before `data: [DONE]`. Every error, of any route, is in OpenAI's shape (frontend.errors).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from client.results import Chunk
from deploy.contract import Timing

from .backend import Backend
from .errors import SERVER, UNAVAILABLE, ApiError, invalid, unknown_model
from .parse import Generation, parse_chat, parse_completion
from .shapes import DONE, Chat, Completions, Shape, sse, usage

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its response began."""


def create_app(backend: Backend, served_model: str, max_model_len: int | None = None) -> FastAPI:
    """The app serving `backend` as the model `served_model` (max_model_len: shown in
    /v1/models when known)."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()

    app = FastAPI(title="DistServe OpenAI-compatible API", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    created = int(time.time())
    card = {"id": served_model, "object": "model", "created": created, "owned_by": "distserve",
            **({"max_model_len": max_model_len} if max_model_len else {})}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)          # uvicorn then logs the traceback
    async def _server_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {e}", SERVER).body(), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != served_model:
            raise unknown_model(model, served_model)
        return card

    @app.get("/health")
    async def health() -> Response:
        if await backend.ready():
            return Response(status_code=200)
        raise ApiError(503, "the model is not ready (or Triton does not answer)", UNAVAILABLE,
                       None, "model_not_ready")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        gen = parse_completion(await _json(request), served_model)
        return await _answer(request, backend, gen, Completions(served_model, gen.include_usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gen = parse_chat(await _json(request), served_model)
        return await _answer(request, backend, gen, Chat(served_model, gen.include_usage))

    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(None, f"the request body is not valid JSON: {e}") from None


async def _answer(request: Request, backend: Backend, gen: Generation, shape: Shape) -> Response:
    chunks = backend.stream(gen.values)
    try:
        if gen.stream:
            first = await _until_disconnected(request, _first(chunks))
            return _EventStream(_events(shape, first, chunks), chunks)
        text, reason, timing = await _until_disconnected(request, _collect(chunks))
        return JSONResponse(shape.whole(text, reason, usage(timing)))
    except ClientGone:
        await chunks.aclose()
        return Response(status_code=499)        # nobody reads it (nginx's "client closed")


async def _first(chunks: AsyncIterator[Chunk]) -> Chunk:
    chunk = await anext(chunks, None)
    if chunk is None:
        raise ApiError(500, "Triton ended the request without a response", SERVER)
    return chunk


async def _collect(chunks: AsyncIterator[Chunk]) -> tuple[str, str, Timing | None]:
    """The whole text, the finish reason and the server's timing."""
    texts, reason, timing = [], None, None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            texts.append(chunk.text)
            reason, timing = chunk.finish_reason or reason, chunk.timing or timing
    if reason is None:
        _ended_early()
    return "".join(texts), reason, timing


async def _events(shape: Shape, chunk: Chunk, chunks: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    """The stream's server-sent events, from its first chunk (already read) on."""
    async with contextlib.aclosing(chunks):
        try:
            for event in shape.opening():
                yield sse(event)
            while chunk.finish_reason is None:
                if chunk.text:
                    yield sse(shape.delta(chunk.text))
                chunk = await anext(chunks, None) or _ended_early()
            if chunk.text:
                yield sse(shape.delta(chunk.text))
            yield sse(shape.delta("", chunk.finish_reason))
            if shape.include_usage:
                yield sse(shape.usage_chunk(usage(chunk.timing)))
        except ApiError as e:
            yield sse(e.body())
        yield DONE


def _ended_early() -> NoReturn:
    raise ApiError(500, "Triton ended the request without a finish reason", SERVER)


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events; however the response ends (a client gone before the first event
    included), the model's stream `chunks` is closed: finished, or cancelled on the server."""
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], chunks: AsyncIterator[Chunk]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self._chunks = chunks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._chunks.aclose()
