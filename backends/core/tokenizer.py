"""Text <-> token ids for a served model, from a GGUF file or a Hugging Face tokenizer folder.

    tok = Tokenizer.load(path)                      # .gguf file or dir with tokenizer.json
    prompt = tok.apply_chat_template(messages)      # ChatML etc., rendered in a jinja sandbox
    ids = tok.encode(prompt)
    detok = IncrementalDetokenizer(tok)             # per request: ids -> text deltas
    stops = StopStringMatcher(("\\n\\n",))          # per request: holds back a possible stop
    text = stops.feed(detok.step([next_id]))

The BPE itself is the `tokenizers` library; this module only rebuilds its config from GGUF metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from backends.core.gguf_file import read_metadata

ROLES = frozenset({"system", "user", "assistant", "tool"})
# End-of-turn tokens a chat model may emit instead of its eos; used only if registered as special.
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How one llama.cpp `tokenizer.ggml.pre` type splits text before BPE."""
    split: str | None = None          # None: GPT-2's own regex (inside ByteLevel)
    individual_digits: bool = False   # StarCoder-style: every digit its own piece
    nfc: bool = False
    ignore_merges: bool = False       # a whole piece found in the vocab is kept as is


_LLAMA3 = _PreTokenizer(split=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = _PreTokenizer(split=_QWEN2_SPLIT, nfc=True)
_STARCODER = _PreTokenizer(individual_digits=True)
PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "gpt2": _PreTokenizer(),
    "smollm": _STARCODER, "starcoder": _STARCODER, "refact": _STARCODER, "codeshell": _STARCODER,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


@dataclass(frozen=True)
class Tokenizer:
    backend: Backend
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    extra_stop_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A `.gguf` file or a Hugging Face folder holding tokenizer.json."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir():
            return cls.from_dir(path)
        raise FileNotFoundError(f"no tokenizer at {path}: expected a .gguf file or a directory with tokenizer.json")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        meta = read_metadata(path, "tokenizer.")
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF") -> Tokenizer:
        """Build from `tokenizer.*` GGUF keys, decoded (`gguf_file.read_metadata`)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            raise NotImplementedError(
                f"{source}: SentencePiece GGUF vocabularies (tokenizer.ggml.model 'llama') are not supported; "
                "load the model's Hugging Face folder with tokenizer.json instead")
        if kind != "gpt2":
            raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2')")
        tokens = meta["tokenizer.ggml.tokens"]
        backend = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre", "gpt2"))
        _add_gguf_added_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type", []))
        return cls(
            backend=backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        backend = Backend.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        gen_eos = _read_json(root / "generation_config.json").get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        bos = _token_id(backend, config.get("bos_token"))
        eos = _token_id(backend, config.get("eos_token"))
        if eos is None and gen_eos_ids:
            eos = gen_eos_ids[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # infer from the post-processor in tokenizer.json
            add_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
        return cls(
            backend=backend, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=_token_id(backend, config.get("pad_token")), add_bos=bool(add_bos),
            chat_template=_dir_chat_template(root, config), extra_stop_ids=frozenset(gen_eos_ids),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """eos, the generation config's eos ids, and known end-of-turn tokens registered as special."""
        special = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids = {special[t] for t in _STOP_TOKENS if t in special} | set(self.extra_stop_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens in `text` (e.g. "<|im_start|>") become one id each; BOS only if the model adds it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's jinja chat template, as transformers does."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        _validate_messages(messages)
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(self.eos_token_id),
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.id_to_token(token_id)


class IncrementalDetokenizer:
    """Token ids in, text deltas out, for one stream.

    Keeps a window `ids`, where `ids[:read]` is text already emitted. It decodes `ids[:read]` and all
    of `ids` and emits the difference, so the decoder sees the same context a full decode would
    (byte merging, leading-space rules). Nothing is emitted while the text ends in U+FFFD (a token
    stopped mid-character); once emitted, the window drops what precedes `read`, so it stays a few
    tokens long. Concatenated deltas plus `flush()` equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0

    def step(self, new_ids: Sequence[int]) -> str:
        """Add the newly generated ids; return the text they complete (maybe "")."""
        self._ids.extend(new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, even an incomplete character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[:self._read], skip_special_tokens=self._skip_special_tokens)
        full = decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return full[len(prefix):]


class StopStringMatcher:
    """Cuts a text stream at the first stop string, holding back text that could start one.

    `feed` returns the text that is safe to send; once a stop string is seen, `matched` names it,
    the text before it is returned, and everything after is dropped.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.stop_strings = tuple(stop_strings)
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stop_strings if s in buf]
        if hits:
            pos, self.matched = min(hits, key=lambda hit: hit[0])
            self._held = ""
            return buf[:pos]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of the stream, release the held-back text."""
        held, self._held = self._held, ""
        return held

    def _partial_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        longest = min(len(buf), max((len(s) for s in self.stop_strings), default=1) - 1)
        for n in range(longest, 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stop_strings):
                return n
        return 0


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer type {pre!r} (supported: {sorted(PRE_TOKENIZERS)})")
    spec = PRE_TOKENIZERS[pre]
    vocab = {_byte_level_spelling(t): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=spec.ignore_merges))
    if spec.split is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(spec.split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if spec.individual_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.normalizer = normalizers.NFC() if spec.nfc else None
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_spelling(token: str) -> str:
    """Tokens outside the byte alphabet (added tokens stored as raw text) get respelled into it."""
    if set(token) <= _BYTE_ALPHABET:
        return token
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(token)[0][0]


def _add_gguf_added_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special, user-defined ones plain added tokens; both are matched whole."""
    vocab = backend.get_vocab()
    picked = [(t, kind) for t, kind in zip(tokens, token_types) if kind in (_CONTROL, _USER_DEFINED) and t in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in picked if k == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in picked if k == _USER_DEFINED])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_id(backend: Backend, token: str | dict[str, Any] | None) -> int | None:
    if isinstance(token, dict):  # older configs serialize AddedToken
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _dir_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] role must be one of {sorted(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] content must be a str, got {type(message.get('content')).__name__}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
