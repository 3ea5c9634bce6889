"""Messages between the orchestrator and the prefill / decode / colocated instances (JSON over
BYTES tensors).

Full request data crosses once (orchestrator -> prefill -> decode, or orchestrator ->
colocated); decode and colocated instances stream back only new tokens. Parsing is strict: a
message from the network is validated before anything acts on it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from backends.core.sampling import SamplingParams

MAX_MESSAGE_BYTES = 4 << 20


def params_to_dict(p: SamplingParams) -> dict[str, Any]:
    d = asdict(p)
    d["stop"], d["stop_token_ids"] = list(p.stop), list(p.stop_token_ids)
    return d


def params_from_dict(d: dict[str, Any]) -> SamplingParams:
    if not isinstance(d, dict):
        raise ValueError("params must be an object")
    known = set(SamplingParams.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
    d = dict(d)
    for key in ("stop", "stop_token_ids"):
        if key in d:
            if not isinstance(d[key], list):
                raise ValueError(f"{key} must be a list")
            d[key] = tuple(d[key])
    return SamplingParams(**d)


def _load(raw: bytes | str, what: str) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{what} message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} message is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} message must be a JSON object")
    return d


def _req_id(d: dict[str, Any]) -> str:
    r = d.get("req_id")
    if not isinstance(r, str) or not 0 < len(r) <= 256:
        raise ValueError("req_id must be a non-empty string of at most 256 characters")
    return r


def _token_ids(d: dict[str, Any], key: str) -> list[int]:
    ids = d.get(key)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{key} must be a list of integers")
    return ids


@dataclass(frozen=True)
class PrefillRequest:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    KIND: ClassVar[str] = "prefill request"

    def to_json(self) -> str:
        return json.dumps({"req_id": self.req_id, "prompt_ids": self.prompt_ids,
                           "params": params_to_dict(self.params)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> PrefillRequest:
        d = _load(raw, cls.KIND)
        return cls(_req_id(d), _token_ids(d, "prompt_ids"), params_from_dict(d.get("params", {})))


@dataclass(frozen=True)
class GenerateRequest(PrefillRequest):
    """A whole request for a colocated instance (both phases in one engine): same fields."""
    KIND: ClassVar[str] = "generate request"


@dataclass(frozen=True)
class PrefillResult:
    req_id: str
    first_token_id: int
    finished: bool                      # the first token already ended the request
    finish_reason: str | None = None
    kv: str | None = None               # KV descriptor JSON (None if finished)
    seed: int | None = None             # the seed decode must continue with
    instance_id: str = ""               # the prefill instance holding the KV (for cancel)
    prefill_s: float = 0.0              # time in the forward pass
    queue_s: float = 0.0                # time waiting for a batch

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> PrefillResult:
        d = _load(raw, "prefill result")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class DecodeRequest:
    req_id: str
    prompt_ids: list[int]
    first_token_id: int
    params: SamplingParams              # carries the seed the prefill instance used
    kv: str                             # KV descriptor JSON

    def to_json(self) -> str:
        return json.dumps({"req_id": self.req_id, "prompt_ids": self.prompt_ids,
                           "first_token_id": self.first_token_id,
                           "params": params_to_dict(self.params), "kv": self.kv})

    @classmethod
    def from_json(cls, raw: bytes | str) -> DecodeRequest:
        d = _load(raw, "decode request")
        first = d.get("first_token_id")
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError("first_token_id must be a non-negative integer")
        if not isinstance(d.get("kv"), str):
            raise ValueError("kv must be a KV descriptor string")
        params = params_from_dict(d.get("params", {}))
        if params.seed is None:
            raise ValueError("params.seed is required (the seed prefill sampled with)")
        return cls(_req_id(d), _token_ids(d, "prompt_ids"), first, params, d["kv"])


@dataclass(frozen=True)
class DecodeOutput:
    """One streamed output of a decode (or colocated) instance: new tokens, or news about them."""
    req_id: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    kv_bytes: int = 0                   # set on the first output: the KV hand-off
    kv_seconds: float = 0.0
    instance_id: str = ""
    admitted_at: float = 0.0            # time.monotonic() when the KV was in (host-wide clock)
    queue_s: float = 0.0                # colocated, with the first token: waiting before its first step
    prefill_s: float = 0.0              # colocated, with the first token: first step to first token

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, 0, 0.0, "", [])
                           or k in ("req_id", "finished")})

    @classmethod
    def from_json(cls, raw: bytes | str) -> DecodeOutput:
        d = _load(raw, "decode output")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
