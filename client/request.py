"""One request's inputs: type-checked plain values, then the HTTP JSON body or the gRPC request.

Only types are checked here; what the values mean (ranges, exactly one prompt form, context
length) is the server's to judge, so its messages reach the caller unchanged. Names, dtypes
and dims come from deploy.contract.DISTSERVE_SPEC.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

from deploy.contract import (BAD_WORDS, DISTSERVE_SPEC, FREQUENCY_PENALTY, IGNORE_EOS, INPUT_IDS,
                             MAX_TOKENS, MESSAGES, MIN_TOKENS, PRESENCE_PENALTY, REPETITION_PENALTY,
                             RETURN_TIMING, RETURN_TOKEN_IDS, SEED, SLO_TPOT, SLO_TTFT, STOP, STREAM,
                             TEMPERATURE, TEXT_INPUT, TOP_K, TOP_P)

Messages = Sequence[dict[str, Any]] | str       # chat messages, or that list as a JSON string


def build_inputs(prompt: str | None = None, *, messages: Messages | None = None,
                 input_ids: Sequence[int] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool | None = None,
                 return_token_ids: bool = False, return_timing: bool = False,
                 slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
                 min_tokens: int | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 bad_words: str | Sequence[str] | None = None,
                 stream: bool = False) -> dict[str, Any]:
    """Input name -> plain value for the `distserve` model; arguments left as None are omitted
    (the server's defaults apply). Raises TypeError for a value of the wrong type. What each
    input means, its default and its errors: docs/api.md."""
    values: dict[str, Any] = {
        TEXT_INPUT: _check(prompt, str, "prompt"),
        MESSAGES: _messages(messages),
        INPUT_IDS: _int_list(input_ids),
        MAX_TOKENS: _int(max_tokens, "max_tokens"),
        TEMPERATURE: _float(temperature, "temperature"),
        TOP_P: _float(top_p, "top_p"),
        TOP_K: _int(top_k, "top_k"),
        SEED: _int(seed, "seed"),
        STOP: _strings(stop, "stop"),
        IGNORE_EOS: _check(ignore_eos, bool, "ignore_eos"),
        RETURN_TOKEN_IDS: _check(return_token_ids, bool, "return_token_ids") or None,
        RETURN_TIMING: _check(return_timing, bool, "return_timing") or None,
        SLO_TTFT: _float(slo_ttft_s, "slo_ttft_s"),
        SLO_TPOT: _float(slo_tpot_s, "slo_tpot_s"),
        MIN_TOKENS: _int(min_tokens, "min_tokens"),
        REPETITION_PENALTY: _float(repetition_penalty, "repetition_penalty"),
        PRESENCE_PENALTY: _float(presence_penalty, "presence_penalty"),
        FREQUENCY_PENALTY: _float(frequency_penalty, "frequency_penalty"),
        BAD_WORDS: _strings(bad_words, "bad_words"),
        STREAM: _check(stream, bool, "stream"),
    }
    return {name: value for name, value in values.items() if value is not None}


def http_body(values: dict[str, Any]) -> bytes:
    """The JSON body of a `generate` / `generate_stream` request."""
    return json.dumps(values, ensure_ascii=False).encode("utf-8")


def grpc_request(model: str, values: dict[str, Any], request_id: str) -> Any:
    """The ModelInferRequest of one gRPC stream request: a tensor per value, and
    `triton_enable_empty_final_response`, so that Triton flags the request's last response
    (`triton_final_response`) even when the model ends it with flags alone."""
    from tritonclient.grpc import service_pb2
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, value in values.items():
        array, dtype = to_array(name, value), DISTSERVE_SPEC.input(name).dtype
        request.inputs.add(name=name, datatype=dtype, shape=array.shape)
        request.raw_input_contents.append(
            (serialize_byte_tensor(array).item() if array.size else b"") if dtype == "BYTES"
            else array.tobytes())
    return request


def to_array(name: str, value: Any) -> np.ndarray:
    """A plain value as the numpy array the contract's spec for `name` asks for."""
    spec = DISTSERVE_SPEC.input(name)
    items = list(value) if spec.dims == (-1,) else [value]
    if spec.dtype == "BYTES":
        return np.array([str(x).encode("utf-8") for x in items], dtype=np.object_)
    return np.array(items, dtype=triton_to_np_dtype(spec.dtype))


def _check(value: Any, kind: type, name: str) -> Any:
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(value: Any, name: str) -> int | None:
    if isinstance(value, np.integer):
        value = int(value)
    return _check(value, int, name)


def _float(value: Any, name: str) -> float | None:
    if isinstance(value, (int, np.integer, np.floating)) and not isinstance(value, bool):
        value = float(value)
    return _check(value, float, name)


def _int_list(values: Sequence[int] | None) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise TypeError("input_ids must be a sequence of int, got a string")
    return [_int(v, "each of input_ids") for v in values]


def _messages(messages: Messages | None) -> str | None:
    if messages is None or isinstance(messages, str):
        return messages
    if not isinstance(messages, Sequence) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'} "
                        "or that list as a JSON string")
    return json.dumps(list(messages), ensure_ascii=False)


def _strings(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    """A string or strings (stop, bad_words) as a list; None when there are none."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    for s in items:
        _check(s, str, f"each of {name}")
    return items or None
