"""Tokenizer built from the GGUF, checked against transformers' own GGUF tokenizer."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jinja2
import pytest

from backends.core.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

MODEL = Path(os.environ.get("DISTSERVE_MODEL", "/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf"))

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "   leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  mixed \n",
    "1234567890 3.14159 -42 1e-9 $1,000,000",
    "I'm sure they'll say it's what we've done, isn't it?",
    "café naïve résumé Zürich façade",
    "Привет, мир! Γειά σου κόσμε",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな",
    "emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇺🇸🇯🇵",
    "مرحبا بالعالم",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "",
    "a",
    "https://example.com/path?q=1&r=two#frag",
    "SHOUTING AND camelCaseIdentifiers snake_case_names",
]
UNICODE_HEAVY = "😀 你好世界 🎉🇯🇵 日本語 👨‍👩‍👧‍👦 naïve 🙂 Ω≈ç√∫ 한국어 텍스트 🏳️‍🌈"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the GPU cross the road? 🐔"},
        {"role": "user", "content": "再来一个"},
    ],
]


@pytest.fixture(scope="module")
def gguf_meta() -> dict:
    if not MODEL.is_file():
        pytest.skip(f"GGUF model not found at {MODEL} (set DISTSERVE_MODEL)")
    from backends.core.gguf_file import read_metadata     # tests/test_gguf_file.py: as gguf-py reads it
    return read_metadata(MODEL, "tokenizer.")


@pytest.fixture(scope="module")
def tok(gguf_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta, source=str(MODEL))


@pytest.fixture(scope="module")
def hf(gguf_meta: dict):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_atomic(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, *tok.encode("user\nhi"), 2]
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_gguf_metadata(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert not tok.add_bos and tok.encode("hi")[0] != tok.bos_token_id
    assert tok.vocab_size == 49152
    assert tok.stop_token_ids == frozenset({0, 2})  # <|im_end|> (eos) and <|endoftext|>
    assert tok.id_to_token(1) == "<|im_start|>"
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.id_to_token(10**7)


def test_load_gguf_path(tok: Tokenizer) -> None:
    loaded = Tokenizer.load(str(MODEL))
    assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert loaded.chat_template == tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_other_pre_tokenizers_match_transformers(gguf_meta: dict, pre: str) -> None:
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    arch, hf_dict, _ = mapping.get_gguf_tokenizer(str(MODEL))
    hf_backend, _ = mapping.convert_gguf_tokenizer(arch, dict(hf_dict, pre_tokenizer_type=pre))
    ours = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": pre})
    for text in TEXTS:
        assert ours.encode(text) == hf_backend.encode(text).ids, (pre, text)


def test_unsupported_gguf_tokenizers(gguf_meta: dict) -> None:
    with pytest.raises(ValueError, match="'made-up'"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": "made-up"})
    with pytest.raises(NotImplementedError, match="SentencePiece"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": "bert"})


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok: Tokenizer, hf, messages: list[dict]) -> None:
    ours = tok.apply_chat_template(messages)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize("messages, problem", [
    ({"role": "user", "content": "hi"}, "list"),
    ([], "non-empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "robot", "content": "hi"}], "role must be one of"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] content must be a str"),
    ([{"role": "user", "content": ["parts"]}], "content must be a str"),
])
def test_chat_template_rejects_bad_messages(tok: Tokenizer, messages, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)


def test_chat_template_missing_and_sandboxed(tok: Tokenizer) -> None:
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        dataclasses.replace(tok, chat_template=None).apply_chat_template(hi)
    with pytest.raises(jinja2.TemplateError, match="only system"):
        dataclasses.replace(tok, chat_template="{{ raise_exception('only system') }}").apply_chat_template(hi)
    with pytest.raises(jinja2.exceptions.SecurityError):
        dataclasses.replace(tok, chat_template="{{ messages.append(1) }}").apply_chat_template(hi)
    rendered = dataclasses.replace(tok, chat_template="{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}")
    assert rendered.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>|<|im_end|>|[{"role": "user", "content": "é"}]')


def _stream(tok: Tokenizer, ids: list[int], chunk: int) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_incremental_detokenizer_unicode(tok: Tokenizer, chunk: int) -> None:
    ids = tok.encode(UNICODE_HEAVY)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "text should split characters across tokens"
    deltas = _stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == UNICODE_HEAVY
    assert not any("\ufffd" in d for d in deltas)
    if chunk == 1:
        assert "" in deltas[:-1]  # held back while a character was incomplete


def test_incremental_detokenizer_skips_special_and_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode(("<|im_start|>assistant\n" + UNICODE_HEAVY + " Done.<|im_end|>\n") * 20)
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for token_id in ids:
        deltas.append(detok.step([token_id]))
        assert len(detok._ids) <= 8  # bounded window, not the whole stream
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert "<|im_start|>" not in "".join(deltas)


def test_incremental_detokenizer_truncated_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    deltas = _stream(tok, ids[:cut], 1)
    assert "".join(deltas) == tok.decode(ids[:cut])
    assert "\ufffd" not in "".join(deltas[:-1]) and deltas[-1].endswith("\ufffd")


def test_stop_string_split_across_deltas() -> None:
    stops = StopStringMatcher(["STOP"])
    assert [stops.feed(t) for t in ["Hel", "lo S", "T"]] == ["Hel", "lo ", ""]
    assert stops.feed("OP and more") == "" and stops.matched == "STOP" and stops.stopped
    assert stops.feed("anything") == "" and stops.flush() == ""


def test_stop_string_false_alarm_is_released() -> None:
    stops = StopStringMatcher(["\n\nUser:"])
    assert stops.feed("a\n\nUs") == "a"
    assert stops.feed("ually") == "\n\nUsually"
    assert stops.feed("end\n") == "end"
    assert stops.flush() == "\n" and not stops.stopped


def test_stop_string_earliest_wins_and_edges() -> None:
    stops = StopStringMatcher(["world", "lo"])
    assert stops.feed("hello world") == "hel" and stops.matched == "lo"
    assert StopStringMatcher(["x"]).feed("xyz") == ""
    assert StopStringMatcher([]).feed("abc") == "abc"
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_missing_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_from_dir_matches_gguf(tok: Tokenizer, hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    ours = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == tok.encode(text) == hf.encode(text)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos) == (1, 2, False)
    assert ours.stop_token_ids == frozenset({0, 2, 5})
    assert ours.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
