"""An OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) in front
of Triton's `distserve` model, reached over gRPC streaming.

    python -m frontend --triton 127.0.0.1:8001 --port 8003       # beside a running server
    python -m deploy serve                                        # starts it next to Triton

Modules: `parse` (OpenAI request -> model inputs), `shapes` (responses, chunks, SSE), `errors`
(OpenAI's error shape, Triton's errors classified), `backend` (the gRPC stream), `app` (the
routes), `server` (uvicorn, foreground or in a thread).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deploy.contract import DISTSERVE

if TYPE_CHECKING:
    from .server import FrontendServer

DEFAULT_PORT = 8003             # next to Triton's 8000 (HTTP), 8001 (gRPC), 8002 (metrics)


def served_model_name(model_path: str | Path) -> str:
    """The name clients call the model by: its file's stem ("SmolLM2-135M-Instruct.Q4_1"), or
    its folder's name for a Hugging Face checkpoint."""
    return Path(model_path).stem if Path(model_path).suffix == ".gguf" else Path(model_path).name


def make_server(triton_grpc_url: str, served_model: str, *, host: str = "127.0.0.1",
                port: int = DEFAULT_PORT, triton_model: str = DISTSERVE,
                max_model_len: int | None = None, timeout: float | None = None) -> FrontendServer:
    """The front end for the model `triton_model` at `triton_grpc_url`, bound to host:port
    (raises OSError when it cannot bind), not yet serving."""
    from .app import create_app
    from .backend import DEFAULT_TIMEOUT_S, TritonBackend
    from .server import FrontendServer
    backend = TritonBackend(triton_grpc_url, triton_model, timeout or DEFAULT_TIMEOUT_S)
    return FrontendServer(create_app(backend, served_model, max_model_len), host, port)
