"""An OpenAI request body -> the `distserve` model's inputs (client.request.build_inputs values).

    gen = parse_completion(body, served_model)     # POST /v1/completions
    gen = parse_chat(body, served_model)           # POST /v1/chat/completions

Every field the server acts on is checked here, and a bad one is a 400 naming it (frontend.errors).
Fields that would change the result and are not supported (logprobs, tools, n > 1, logit_bias,
echo, ...) are refused by name unless they hold their neutral value; fields that
change nothing here (user, metadata, store, ...) and unknown fields are ignored, as vLLM does.
vLLM's `top_k`, `ignore_eos`, `min_tokens` and `repetition_penalty` are accepted (`vllm bench
serve --ignore-eos` sends ignore_eos), as are OpenAI's presence / frequency penalties.
What only the server can judge (the prompt's length against the context) it answers itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from client.request import build_inputs

from .errors import invalid, unknown_model, unsupported

MAX_SEED = 2 ** 63                 # the engine's seeds are in [0, 2**63)
MAX_INT32 = 2 ** 31 - 1            # max_tokens, top_k and token ids are INT32 inputs

# Field -> "its value changes nothing": anything else is refused by name.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "logit_bias": lambda v: not v,
    "best_of": lambda v: v is None or v == 1,
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "use_beam_search": lambda v: v is None or v is False,
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Generation:
    """One parsed request: the model's inputs, and how to answer."""
    values: dict[str, Any]              # distserve input name -> plain value
    stream: bool
    include_usage: bool                 # streaming: a last chunk with the usage


def parse_completion(body: Any, served_model: str) -> Generation:
    body = _checked(body, served_model)
    prompt, input_ids = _prompt(body.get("prompt"))
    return _generation(body, _int(body, "max_tokens", 1, MAX_INT32), prompt=prompt, input_ids=input_ids)


def parse_chat(body: Any, served_model: str) -> Generation:
    body = _checked(body, served_model)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _generation(body, _int(body, key, 1, MAX_INT32), messages=_messages(body.get("messages")))


def _checked(body: Any, served_model: str) -> dict[str, Any]:
    """The body, once it is an object for the served model, with no refused field."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise unknown_model(str(model), served_model)
    for name, neutral in _NEUTRAL.items():
        if not neutral(body.get(name)):
            raise unsupported(name)
    if body.get("n") not in (None, 1):
        raise unsupported("n", f"only n=1 is supported, got {body['n']!r}")
    return body


def _generation(body: dict[str, Any], max_tokens: int | None, **prompt: Any) -> Generation:
    """Sampling and streaming, as both endpoints take them."""
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    top_k = _int(body, "top_k", -1, MAX_INT32)
    values = build_inputs(
        **prompt, max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, open_low=True),
        top_k=None if top_k is None else max(top_k, 0),        # vLLM: -1 disables, ours: 0
        seed=_int(body, "seed", 0, MAX_SEED - 1), stop=_stop(body.get("stop")),
        ignore_eos=_bool(body, "ignore_eos"), min_tokens=_int(body, "min_tokens", 0, MAX_INT32),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 100.0, open_low=True),
        return_timing=True, stream=stream)
    return Generation(values, stream, stream and bool(include_usage))


def _prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """A string, one string in a list, token ids, or one list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "prompt must not be empty")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t <= MAX_INT32 for t in prompt):
        return None, prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise unsupported("prompt", "one prompt per request (send a batch as separate requests)")
    raise invalid("prompt", "prompt must be a non-empty string or a non-empty list of token ids")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty array of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"{where}.role", "tool and function calls are not supported")
        if role not in _ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}")
        out.append({"role": _ROLES[role], "content": _content(message.get("content"), role, where)})
    return out


def _content(content: Any, role: str, where: str) -> str:
    """A message's text: a string, or text parts (joined by newlines, as vLLM does)."""
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        for part in content:
            if part.get("type") != "text":
                raise unsupported(f"{where}.content", f"content parts of type {part.get('type')!r} "
                                  "(only 'text' parts are)")
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content", f"a text part of {where}.content has no string 'text'")
        return "\n".join(part["text"] for part in content)
    raise invalid(f"{where}.content", f"{where}.content must be a string or an array of text parts")


def _stop(stop: Any) -> list[str] | None:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None or stops == []:
        return None
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "stop must be a non-empty string or an array of non-empty strings")
    return stops


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise invalid(name, f"{name} must be {bound}, got {value!r}")
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float,
            open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if open_low else value >= low) and value <= high)
    if not ok:
        raise invalid(name, f"{name} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], "
                            f"got {value!r}")
    return float(value)


def _bool(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(param or name, f"{param or name} must be true or false, got {value!r}")
    return value
