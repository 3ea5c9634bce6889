"""Where the front end's requests go: Triton's `distserve` model over one gRPC channel.

`TritonBackend.stream(values)` is client.grpc_stream.GrpcChannel.stream (the project's one gRPC
stream path: a bidirectional ModelStreamInfer per request, ended by Triton's final flag; closing
the iterator early cancels the RPC, and Triton then cancels the request, so the engines free it)
with its errors turned into OpenAI-shaped ones. The channel is opened on first use, in the
serving loop, and shared by all requests; `close()` at the app's shutdown.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from client.grpc_stream import GrpcChannel
from client.results import Chunk, DistServeError
from deploy.contract import DISTSERVE

from .errors import backend_error

DEFAULT_TIMEOUT_S = 600.0          # the longest wait for any one response (a long queue, a prefill)


class Backend(Protocol):
    def stream(self, values: dict[str, Any]) -> AsyncIterator[Chunk]: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class TritonBackend:
    """Args:
        url: Triton's gRPC endpoint, "host:port".
        model: the Triton model to call (`distserve`, or `distserve_colocated` for the baseline).
        timeout: seconds to wait for each response before failing the request.
    """

    def __init__(self, url: str, model: str = DISTSERVE, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._channel = GrpcChannel(url)

    async def stream(self, values: dict[str, Any]) -> AsyncIterator[Chunk]:
        """The request's chunks as Triton sends them; raises frontend.errors.ApiError."""
        try:
            async with contextlib.aclosing(self._channel.stream(self.model, values, self.timeout)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except DistServeError as e:
            raise backend_error(e) from None

    async def ready(self) -> bool:
        """Whether Triton answers and reports the model ready."""
        from tritonclient.grpc.aio import InferenceServerClient
        from tritonclient.utils import InferenceServerException
        client = InferenceServerClient(self.url)
        try:
            return bool(await client.is_model_ready(self.model))
        except InferenceServerException:
            return False
        finally:
            await client.close()

    async def close(self) -> None:
        await self._channel.close()
