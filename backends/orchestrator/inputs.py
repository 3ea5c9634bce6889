"""A `distserve` request's inputs (plain Python values) -> its sampling parameters.

Two vocabularies name the same inputs (deploy/contract.py): ours and TensorRT-LLM's ensemble
contract. An alias is the same input under TRT-LLM's name (`stop_words` = `stop`,
`random_seed` = `seed`, `min_length` = `min_tokens`); a request giving both is refused.
TRT-LLM inputs we cannot honour beyond their default (beam search, length penalty, several
sequences, log probs, logits) are refused when set to anything else, naming the input; `pad_id`
is accepted and has no effect (nothing is padded here). Every refusal is a ValueError, which
the adapter answers as INVALID_ARG.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from backends.core.sampling import MAX_SEED, SamplingParams, resolve_eos
from backends.core.tokenizer import Tokenizer

ALIASES = {"stop_words": "stop", "random_seed": "seed", "min_length": "min_tokens"}
# input -> the one value we support (what TRT-LLM does by default)
ONLY_DEFAULT: dict[str, Any] = {
    "beam_width": 1, "length_penalty": 1.0, "num_return_sequences": 1,
    "return_log_probs": False, "return_context_logits": False, "return_generation_logits": False,
    "return_perf_metrics": False,
}
_WHY = {"beam_width": "beam search is not implemented", "length_penalty": "it applies to beam search only",
        "num_return_sequences": "one sequence per request", "return_log_probs":
        "log probabilities are not returned (cum_log_probs / output_log_probs are not outputs)",
        "return_context_logits": "logits are not returned", "return_generation_logits":
        "logits are not returned", "return_perf_metrics": "use return_timing"}


def canonical(inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` under our names: aliases renamed, inputs at their only supported value dropped.
    Raises ValueError for an alias given with its twin, or an unsupported value."""
    out = dict(inputs)
    for alias, name in ALIASES.items():
        if alias in out:
            if name in out:
                raise ValueError(f"give {name!r} or {alias!r} (TensorRT-LLM's name for it), not both")
            out[name] = out.pop(alias)
    for name, only in ONLY_DEFAULT.items():
        if name in out and out.pop(name) != only:
            raise ValueError(f"{name} {inputs[name]!r} is not supported ({_WHY[name]}): "
                             f"leave it out or send {only!r}")
    out.pop("pad_id", None)
    return out


def sampling_params(inputs: dict[str, Any], tokenizer: Tokenizer, max_tokens: Any) -> SamplingParams:
    """The request's SamplingParams (seeded; EOS made explicit where end_id or min_tokens need
    it: sampling.resolve_eos) from `canonical` inputs."""
    seed = inputs.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed > MAX_SEED:
        seed %= MAX_SEED + 1                     # TRT-LLM's random_seed is UINT64
    params = SamplingParams(
        max_tokens=max_tokens, temperature=inputs.get("temperature", 0.0),
        top_p=inputs.get("top_p", 1.0), top_k=inputs.get("top_k", 0), seed=seed,
        stop=tuple(s for s in inputs.get("stop", ()) if s),     # TRT-LLM clients send [""]
        ignore_eos=bool(inputs.get("ignore_eos", False)), min_tokens=inputs.get("min_tokens", 0),
        repetition_penalty=inputs.get("repetition_penalty", 1.0),
        presence_penalty=inputs.get("presence_penalty", 0.0),
        frequency_penalty=inputs.get("frequency_penalty", 0.0),
        bad_words_ids=bad_words_ids(tokenizer, inputs.get("bad_words", ()))).with_seed()
    return resolve_eos(params, tokenizer.stop_token_ids, _end_id(inputs.get("end_id"), tokenizer))


def bad_words_ids(tokenizer: Tokenizer, words: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word's token sequences: the word as given and, unless it starts with a space,
    with one (a word inside a sentence is another token sequence than at its start: " Paris"
    vs "Paris"). Empty words are skipped (TRT-LLM clients send [""] for none)."""
    out: dict[tuple[int, ...], None] = {}
    for word in words:
        for form in (word,) if not word or word[0].isspace() else (word, " " + word):
            ids = tuple(tokenizer.encode(form, add_special_tokens=False))
            if ids:
                out[ids] = None
    return tuple(out)


def _end_id(value: Any, tokenizer: Tokenizer) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < tokenizer.vocab_size:
        raise ValueError(f"end_id must be a token id in [0, {tokenizer.vocab_size}), got {value!r}")
    return value
