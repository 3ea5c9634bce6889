"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

`ApiError` is raised anywhere in the front end and answered by the app's one handler.
`backend_error` classifies what Triton said about a request. Over a gRPC stream Triton sends an
error's message only (no status code), so the class comes from what the message says: the
orchestrator's refusals start with "overloaded" (backends/core/admission.py), a phase without a
live instance says "no <phase> instance", bad input is a ValueError whose message names the
input; anything else is a server error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from client.results import DistServeError

INVALID = "invalid_request_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"

# What the server's messages say, lower-cased; the first table that matches wins.
_UNAVAILABLE_MARKERS = ("no prefill instance", "no decode instance", "is not ready",
                        "unknown model", "is not found")
_INVALID_MARKERS = ("context length", "is too large", "must be", "give exactly one",
                    "is not valid", "the prompt is empty", "no chat template", "messages[",
                    "unable to parse", "unexpected inference input")
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")


@dataclass(eq=False)
class ApiError(Exception):
    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    """A 400 naming the offending field."""
    return ApiError(400, message, INVALID, param, code)


def unsupported(param: str, why: str = "") -> ApiError:
    return invalid(param, f"'{param}' is not supported by this server" + (f": {why}" if why else ""),
                   "unsupported_parameter")


def unknown_model(model: str, served: str) -> ApiError:
    return ApiError(404, f"the model '{model}' does not exist; this server serves '{served}'",
                    INVALID, "model", "model_not_found")


def backend_error(error: DistServeError) -> ApiError:
    """What Triton (or reaching it) answered, as the error an OpenAI client expects."""
    message = _REQUEST_ID.sub("", error.message)
    lowered = message.lower()
    if error.status == "unreachable":
        return ApiError(503, message, UNAVAILABLE, None, "triton_unreachable")
    if error.status == "timeout":
        return ApiError(504, message, SERVER, None, "timeout")
    if lowered.startswith("overloaded"):
        return ApiError(503, message, UNAVAILABLE, None, "overloaded")
    if any(m in lowered for m in _UNAVAILABLE_MARKERS):
        return ApiError(503, message, UNAVAILABLE, None, "model_not_ready")
    if any(m in lowered for m in _INVALID_MARKERS):
        code = "context_length_exceeded" if "context length" in lowered else None
        return ApiError(400, message, INVALID, None, code)
    return ApiError(500, message, SERVER)
