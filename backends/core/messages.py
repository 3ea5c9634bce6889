"""Messages between the orchestrator and the prefill / decode / colocated instances: one tagged
JSON object each (a BYTES tensor), one codec for all of them.

    raw = encode(Tokens("r1", [42]))              # '{"type":"tokens","req_id":"r1",...}'
    msg = decode(raw, Tokens, Failed)             # the types the receiver accepts

To an instance: `PrefillRequest`, `GenerateRequest` (a colocated instance runs both phases),
`DecodeRequest` (carries the KV descriptor, nested). From an instance: `Accepted` (the
request is in, with the instance that holds it), `Prefilled` (prefill's one answer),
`Admitted` (decode: the KV is in), `Tokens` (new tokens; the last carries the finish reason),
`Failed` (the request ended with an error; the same from every phase). Full request data
crosses once (orchestrator -> prefill -> decode, or orchestrator -> colocated); decode and
colocated instances stream back only new tokens.

Decoding is strict: a message from the network is checked against its type's fields (types,
required fields, no unknown keys, nested descriptor validated) before anything acts on it.
"""
from __future__ import annotations

import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Union

from backends.core.sampling import SamplingParams
from kvtransfer.descriptor import KVDescriptor

MAX_MESSAGE_BYTES = 4 << 20
MAX_REQ_ID_CHARS = 256


def params_to_dict(p: SamplingParams) -> dict[str, Any]:
    d = asdict(p)
    d["stop"], d["stop_token_ids"] = list(p.stop), list(p.stop_token_ids)
    return d


def params_from_dict(d: Any) -> SamplingParams:
    if not isinstance(d, dict):
        raise ValueError("params must be an object")
    unknown = set(d) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
    d = dict(d)
    for key in ("stop", "stop_token_ids", "bad_words_ids"):
        if key in d:
            if not isinstance(d[key], list):
                raise ValueError(f"{key} must be a list")
            d[key] = tuple(d[key])
    return SamplingParams(**d)


# ---- the message types ---------------------------------------------------------------------------

def check_req_id(req_id: str) -> None:
    if not isinstance(req_id, str) or not 0 < len(req_id) <= MAX_REQ_ID_CHARS:
        raise ValueError(f"req_id must be a non-empty string of at most {MAX_REQ_ID_CHARS} characters")


@dataclass(frozen=True)
class PrefillRequest:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    TYPE: ClassVar[str] = "prefill"

    def __post_init__(self) -> None:
        check_req_id(self.req_id)


@dataclass(frozen=True)
class GenerateRequest(PrefillRequest):
    """A whole request for a colocated instance (both phases in one engine): the same fields."""
    TYPE: ClassVar[str] = "generate"


@dataclass(frozen=True)
class DecodeRequest:
    req_id: str
    prompt_ids: list[int]
    first_token_id: int
    params: SamplingParams              # carries the seed the prefill instance used
    kv: KVDescriptor
    TYPE: ClassVar[str] = "decode"

    def __post_init__(self) -> None:
        check_req_id(self.req_id)
        if self.first_token_id < 0:
            raise ValueError("first_token_id must be a non-negative integer")
        if self.params.seed is None:
            raise ValueError("params.seed is required (the seed prefill sampled with)")
        if self.kv.num_tokens != len(self.prompt_ids):
            raise ValueError(f"KV descriptor holds {self.kv.num_tokens} tokens, prompt has "
                             f"{len(self.prompt_ids)}")


@dataclass(frozen=True)
class Accepted:
    req_id: str
    instance_id: str                    # where to send a cancel
    TYPE: ClassVar[str] = "accepted"


@dataclass(frozen=True)
class Prefilled:
    """Prefill's answer: the first token and, unless it ended the request, the leased KV."""
    req_id: str
    first_token_id: int
    instance_id: str                    # the prefill instance holding the KV (for cancel)
    finish_reason: str | None = None    # the first token already ended the request
    kv: KVDescriptor | None = None
    seed: int | None = None             # the seed decode must continue with
    queue_s: float = 0.0                # waiting for a batch
    prefill_s: float = 0.0              # first step to first token
    TYPE: ClassVar[str] = "prefilled"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Admitted:
    """Decode: the request's KV is in; it decodes from the next step on."""
    req_id: str
    kv_bytes: int
    kv_seconds: float
    admitted_at: float                  # time.monotonic() (a host-wide clock)
    TYPE: ClassVar[str] = "admitted"


@dataclass(frozen=True)
class Tokens:
    req_id: str
    token_ids: list[int]
    finish_reason: str | None = None    # set on the last
    queue_s: float | None = None        # colocated, with the first token: waiting before its first step
    prefill_s: float | None = None      # colocated, with the first token: first step to first token
    TYPE: ClassVar[str] = "tokens"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Failed:
    req_id: str
    error: str
    code: str = ""                      # "overloaded": refused at once, retry later
    TYPE: ClassVar[str] = "failed"

    finished: ClassVar[bool] = True


Message = Union[PrefillRequest, GenerateRequest, DecodeRequest, Accepted, Prefilled, Admitted,
                Tokens, Failed]
TYPES: dict[str, type] = {t.TYPE: t for t in typing.get_args(Message)}


def is_final(msg: Message) -> bool:
    """The last message of its request's stream."""
    return isinstance(msg, (Prefilled, Failed)) or (isinstance(msg, Tokens) and msg.finished)


# ---- the codec -------------------------------------------------------------------------------

def encode(msg: Message) -> str:
    out: dict[str, Any] = {"type": msg.TYPE}
    for f, _ in _schema(type(msg)):             # cached: this runs per streamed token
        v = getattr(msg, f.name)
        if v is None:
            continue
        if isinstance(v, SamplingParams):
            v = params_to_dict(v)
        elif isinstance(v, KVDescriptor):
            v = v.to_dict()
        out[f.name] = v
    return json.dumps(out, separators=(",", ":"))


def decode(raw: bytes | str, *expected: type) -> Message:
    """The message in `raw`, which must be one of the `expected` types; ValueError naming what
    is wrong otherwise."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"message is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("message must be a JSON object")
    tag = d.pop("type", None)
    cls = TYPES.get(tag) if isinstance(tag, str) else None
    if cls not in expected:
        raise ValueError(f"expected a {' or '.join(t.TYPE for t in expected)} message, "
                         f"got type {tag!r}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.TYPE} message has unknown fields {sorted(unknown)}")
    kwargs = {}
    for f, kind in _schema(cls):
        if f.name not in d or d[f.name] is None:
            if f.default is MISSING and not _optional(kind):
                raise ValueError(f"{cls.TYPE} message lacks {f.name!r}")
            continue
        kwargs[f.name] = _convert(cls.TYPE, f.name, kind, d[f.name])
    return cls(**kwargs)


_SCHEMAS: dict[type, list] = {}


def _schema(cls: type) -> list:
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        _SCHEMAS[cls] = [(f, hints[f.name]) for f in fields(cls)]
    return _SCHEMAS[cls]


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _convert(what: str, name: str, kind: Any, v: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if _optional(kind):
        kind = args[0]
    bad = ValueError(f"{what} message: {name} must be {getattr(kind, '__name__', kind)}, got {v!r:.80}")
    if kind is str:
        if not isinstance(v, str):
            raise bad
        return v
    if kind is int:
        if not _is_int(v):
            raise bad
        return v
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        return float(v)
    if typing.get_origin(kind) is list:
        if not isinstance(v, list) or not all(_is_int(t) for t in v):
            raise ValueError(f"{name} must be a list of integers")
        return v
    if kind is SamplingParams:
        return params_from_dict(v)
    if kind is KVDescriptor:
        return KVDescriptor.from_dict(v)
    raise TypeError(f"no codec for {kind}")          # a message type this module cannot carry
