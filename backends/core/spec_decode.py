"""Speculative decoding: drafters propose, the target verifies in one step, acceptance is lossless.

Lifecycle of one speculative step (the engine drives it, `LLMEngine.step(drafts=...)`):
1. A drafter proposes up to k tokens for each decoding sequence from its whole token history
   (`propose_drafts`).
2. The scheduler attaches each draft to its sequence's decode row, clipped so that it never
   runs past max_tokens, the context length, the step's token budget or the free KV blocks
   (a draft never preempts anyone): the row carries 1 + k tokens, the last sampled token plus
   the draft, and its KV slots are reserved.
3. One packed forward writes all their K/V and returns logits at every one of those positions;
   `accept_draft` keeps the longest accepted run plus one token from the target.
4. The scheduler appends the accepted tokens (stop criteria checked token by token), counts
   only accepted tokens as cached and returns the blocks held only for rejected ones.

Acceptance. A deterministic drafter (n-gram: the draft token x has draft probability q = 1)
needs no draft probabilities: the target draws its own token t at each position with exactly
the randomness it would use without speculation (sampling.py: the n-th token's noise comes
from mix(seed, n); greedy is argmax) and the draft is accepted while t == x. That accepts x
with probability p(x) and, on rejection, yields t ~ p restricted to tokens != x, renormalized:
the speculative-sampling rule for a one-hot q. So the output is not only distributed as the
target's, it is token-for-token the same as without speculation, per seed.
A drafter with a distribution q (a draft model) uses `accept_with_probs`: accept x with
probability min(1, p(x) / q(x)), else sample from normalize(max(0, p - q)) (Leviathan et al.
2023, Chen et al. 2023); its randomness too comes from mix(seed, n), so it is reproducible.

How many tokens to draft, per sequence and step, when serving: spec_policy.py.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from backends.core.sampling import SamplingParams, _mix, _sample_row, filtered_probs, greedy_tokens
from backends.core.sequence import Sequence


class Drafter(Protocol):
    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """0..k draft tokens to follow `token_ids` (one sequence's prompt + outputs so far)."""
        ...

    # optional: `done(token_ids)`, a sequence has left with these tokens (a drafter that learns
    # from finished text keeps them; NgramDrafter's corpus)


MAX_EVIDENCE = 16          # a match is extended back this far at most when scoring a draft


def _extend_back(a: np.ndarray, a_end: int, b: np.ndarray, b_end: int, n: int) -> int:
    """n, plus how many tokens before a[:a_end] and b[:b_end] also agree (to MAX_EVIDENCE)."""
    back = 0
    while n + back < MAX_EVIDENCE and a_end - n - back > 0 and b_end - n - back > 0 \
            and a[a_end - n - back - 1] == b[b_end - n - back - 1]:
        back += 1
    return n + back


class TokenCorpus:
    """The tokens of recently finished sequences (prompt + output), indexed by their n-grams
    (n = min_n..max_n; each maps to its most recent occurrence): where a sequence's own history
    offers no good match, the n-gram drafter looks here. Code, templated prompts and answers
    repeat across users, so one request's text drafts another's (suffix decoding across
    requests). Bounded to `max_tokens` (the oldest sequences go first); each sequence's last
    `max_doc` tokens. Owned by one instance's step thread."""

    def __init__(self, max_n: int = 4, min_n: int = 2, max_tokens: int = 1 << 16, max_doc: int = 4096) -> None:
        self.max_n, self.min_n, self.max_tokens, self.max_doc = max_n, min_n, max_tokens, max_doc
        self.docs: OrderedDict[int, np.ndarray] = OrderedDict()
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}   # n-gram -> (doc, its end)
        self.num_tokens = 0
        self._next = 0

    def _grams(self, doc: np.ndarray) -> Iterator[tuple[tuple[int, ...], int]]:
        toks = doc.tolist()
        for n in range(self.min_n, self.max_n + 1):
            for end in range(n, len(toks)):                 # a token follows every indexed n-gram
                yield tuple(toks[end - n:end]), end

    def add(self, token_ids: list[int]) -> None:
        doc = np.asarray(token_ids[-self.max_doc:], dtype=np.int64)
        if len(doc) <= self.min_n:
            return
        key, self._next = self._next, self._next + 1
        self.docs[key] = doc
        self.num_tokens += len(doc)
        for gram, end in self._grams(doc):
            self.index[gram] = (key, end)
        while self.num_tokens > self.max_tokens and len(self.docs) > 1:
            old_key, old = self.docs.popitem(last=False)
            self.num_tokens -= len(old)
            for gram, _ in self._grams(old):
                if self.index.get(gram, (None,))[0] == old_key:
                    del self.index[gram]

    def lookup(self, tokens: np.ndarray, k: int) -> tuple[list[int], int]:
        """(draft, evidence) following the longest n-gram ending `tokens`; ([], 0) if none."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            hit = self.index.get(tuple(tokens[-n:].tolist()))
            if hit is not None:
                doc = self.docs[hit[0]]
                return doc[hit[1]:hit[1] + k].tolist(), _extend_back(doc, hit[1], tokens, len(tokens), n)
        return [], 0


class HistoryIndex:
    """One growing token history's n-grams (n = min_n..max_n), each mapped to the end of its
    latest occurrence that a token follows, kept up to date as tokens are appended (`sync`):
    the n-gram drafter's lookup then costs a few dict probes instead of a scan of the whole
    history per step (a batch of long histories asked every step paid 0.1-0.3 ms a sequence).
    It finds exactly the occurrence the scan finds. Keep one per sequence: its history only
    grows. A history that visibly does not extend the indexed one (shorter, or another first
    token or token at the indexed end) is indexed anew. Memory: about 0.45 KB a token (1.8 MB
    for a 4,096-token history, n = 2..4), held while the sequence runs."""

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}

    def sync(self, token_ids: list[int]) -> None:
        """Index `token_ids`, which should extend what was indexed before."""
        toks, old = self.tokens, len(self.tokens)
        if len(token_ids) < old or (old and token_ids[old - 1] != toks[-1]) or (old and token_ids[0] != toks[0]):
            self.ends, old = {}, 0
            toks = self.tokens = []
        toks.extend(token_ids[old:])
        first = max(old, self.min_n)          # ends old..len-1 gained their follower
        for n in range(self.min_n, self.max_n + 1):
            start = max(first, n)
            if start < len(toks):
                grams = zip(*(toks[start - n + i:len(toks) - n + i] for i in range(n)))
                self.ends.update(zip(grams, range(start, len(toks))))

    def lookup(self, k: int) -> tuple[list[int], int]:
        """(draft, evidence) after the latest earlier occurrence of the longest n-gram ending
        the history; ([], 0) if none (as NgramDrafter's scan)."""
        toks = self.tokens
        for n in range(min(self.max_n, len(toks) - 1), self.min_n - 1, -1):
            start = self.ends.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k], _extend_back(toks, start, toks, len(toks), n)
        return [], 0


@dataclass(frozen=True)
class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the last n tokens (n from
    `max_n` down to `min_n`) and propose the tokens that followed it. No model.
    `propose_scored` also says how long the match behind the draft is (the n found, extended
    back while the tokens before both occurrences agree, up to MAX_EVIDENCE): a draft copied
    after a long match is accepted far more often (measured on the default model: the first
    token 47-52% after a 2-token match, 91-97% after 9 or more), which the speculation policy
    (spec_policy.AdaptiveK) learns and uses. With a `corpus` (TokenCorpus: finished sequences'
    text), a history whose own match is short or absent takes the corpus's when that one is
    longer."""
    max_n: int = 4
    min_n: int = 2
    cross_request: bool = True           # keep a corpus of finished sequences
    strong: int = 8                      # an own match this long is not looked up in the corpus
    corpus: TokenCorpus | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")
        if self.cross_request and self.corpus is None:
            object.__setattr__(self, "corpus", TokenCorpus(self.max_n, self.min_n))

    def done(self, token_ids: list[int]) -> None:
        """A sequence left with these tokens: into the corpus."""
        if self.corpus is not None:
            self.corpus.add(token_ids)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return self.propose_scored(token_ids, k)[0]

    def new_index(self) -> HistoryIndex:
        """A sequence's incremental n-gram index, for `propose_scored(..., index=)`."""
        return HistoryIndex(self.max_n, self.min_n)

    def propose_scored(self, token_ids: list[int], k: int,
                       index: HistoryIndex | None = None) -> tuple[list[int], int]:
        """(draft, the length of the match it follows); ([], 0) with no match. `index`: the
        sequence's HistoryIndex (`new_index`), brought up to date with `token_ids` and looked
        up, instead of a scan of the whole history."""
        if index is not None:
            index.sync(token_ids)
        if k <= 0:
            return [], 0
        if index is not None:
            own = index.lookup(k)
            if self.corpus is not None and own[1] < self.strong:
                # evidence never reaches back past MAX_EVIDENCE tokens: the tail scores it in full
                other = self.corpus.lookup(np.asarray(token_ids[-MAX_EVIDENCE:], dtype=np.int64), k)
                if other[1] > own[1]:
                    return other
            return own
        tokens = np.asarray(token_ids, dtype=np.int64)
        own: tuple[list[int], int] = ([], 0)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # windows[i] = tokens[i:i + n], for every i with a token after the window
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n                       # the token after the match
                own = tokens[start:start + k].tolist(), _extend_back(tokens, start, tokens, len(tokens), n)
                break
        if self.corpus is not None and own[1] < self.strong:
            other = self.corpus.lookup(tokens, k)
            if other[1] > own[1]:
                return other
        return own


class KeyedDrafts:
    """A drafter's (draft, score) per live sequence, by key: `propose_scored` where the drafter
    scores (score 0 where it does not), with the sequence's own state (`new_index`, e.g.
    NgramDrafter's HistoryIndex) kept between calls until `forget(key)`. The in-process source
    and the drafter process both draft through one."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.scored = callable(getattr(drafter, "propose_scored", None))
        self._new_index = getattr(drafter, "new_index", None) if self.scored else None
        self._indexes: dict = {}

    def propose(self, key, token_ids: list[int], k: int) -> tuple[list[int], int]:
        if not self.scored:
            return self.drafter.propose(token_ids, k), 0
        if self._new_index is None:
            return self.drafter.propose_scored(token_ids, k)
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = self._new_index()
        return self.drafter.propose_scored(token_ids, k, index=index)

    def propose_many(self, keys: list, histories: list[list[int]], k: int) -> list[tuple[list[int], int]]:
        """`propose` for several sequences: in one batched call where the drafter has one
        (`propose_many`, e.g. a draft model's shared steps; unscored), else one by one."""
        many = getattr(self.drafter, "propose_many", None)
        if many is None or self.scored:
            return [self.propose(key, ids, k) for key, ids in zip(keys, histories)]
        return [(draft, 0) for draft in many(histories, k)]

    def forget(self, key) -> None:
        self._indexes.pop(key, None)


def _model_drafter(**options) -> Drafter:
    from backends.core.model_drafter import ModelDrafter      # it needs the engine, which needs us
    return ModelDrafter(**options)


# the drafters a deployment may name (deploy.deployment.SPECULATIVE_METHODS)
DRAFTERS: dict[str, type] = {"ngram": NgramDrafter, "model": _model_drafter}


def propose_drafts(seqs: Iterable[Sequence], drafter: Drafter, k: int) -> dict[str, list[int]]:
    """Each sequence's draft (sequences with an empty proposal are left out). The scheduler
    uses a draft only where the sequence decodes this step."""
    drafts = {}
    for seq in seqs:
        draft = drafter.propose(seq.all_ids, k)
        if draft:
            drafts[seq.req_id] = draft[:k]
    return drafts


@dataclass
class SpecStats:
    """Counts over verify rows (decode rows that carried a draft)."""
    num_verify_rows: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0         # accepted + the target's own token, per row

    def record(self, num_drafted: int, num_emitted: int) -> None:
        self.num_verify_rows += 1
        self.num_draft_tokens += num_drafted
        self.num_emitted_tokens += num_emitted
        self.num_accepted_tokens += max(0, num_emitted - 1)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.num_emitted_tokens / self.num_verify_rows if self.num_verify_rows else 0.0


# -- acceptance ------------------------------------------------------------------------------
def _target_tokens(logits: torch.Tensor, params: SamplingParams, step: int) -> Iterator[int]:
    # logits: [k + 1, V] -> the target's own token at each position, drawn lazily with the
    # randomness sampling.sample would use for output token `step + j`
    if params.is_greedy:
        yield from greedy_tokens(logits)
        return
    for j in range(logits.shape[0]):
        yield _sample_row(logits[j], params, step + j)


def accept_draft(logits: torch.Tensor, draft: list[int], params: SamplingParams,
                 step: int) -> list[int]:
    """Verify a deterministic drafter's proposal (q one-hot: n-gram, a greedy draft model).

    Args:
        logits: [len(draft) + 1, V] float32, the target's next-token logits after the last
            sampled token and after each draft token.
        draft: the proposed tokens.
        params: the sequence's (seeded) sampling parameters.
        step: index of the first token to emit among the sequence's outputs.
    Returns:
        1..len(draft) + 1 tokens: the accepted draft prefix, then the target's own token at
        the first mismatch (or the bonus token after a fully accepted draft).
    """
    out = []
    for j, token in enumerate(_target_tokens(logits, params, step)):
        out.append(token)
        if j == len(draft) or token != draft[j]:
            break
    return out


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[K, V] logits -> [K, V] the distribution sampling.sample draws from (temperature,
    top_k, top_p applied in its order), normalized; one-hot at the argmax when greedy."""
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = filtered_probs(logits, params)
    return probs / probs.sum(-1, keepdim=True)


def accept_with_probs(logits: torch.Tensor, draft: list[int], draft_probs: torch.Tensor,
                      params: SamplingParams, step: int) -> list[int]:
    """Verify a draft sampled from a distribution q (a sampling draft model).

    Args:
        logits: [len(draft) + 1, V] float32 target logits (as in `accept_draft`).
        draft: the proposed tokens, draft[j] ~ draft_probs[j].
        draft_probs: [len(draft), V] q at each draft position.
        params, step: as in `accept_draft`.
    Returns:
        1..len(draft) + 1 tokens distributed exactly as the target samples them.
    """
    if params.is_greedy:
        return accept_draft(logits, draft, params, step)
    p = target_probs(logits[:len(draft)], params)
    out = []
    for j, x in enumerate(draft):
        gen = torch.Generator().manual_seed(_mix(params.seed or 0, step + j))
        u = torch.rand((), generator=gen)
        q_x = float(draft_probs[j, x])
        if q_x > 0 and u * q_x < p[j, x]:              # u < min(1, p(x) / q(x))
            out.append(x)
            continue
        residual = (p[j] - draft_probs[j]).clamp_min_(0.0)
        if not residual.sum() > 0:                     # p == q: any rejection is measure-zero
            residual = p[j].clone()
        noise = torch.empty_like(residual).exponential_(generator=gen)
        out.append(int((residual / noise).argmax()))    # exponential race: a draw from residual
        return out
    out.append(_sample_row(logits[len(draft)], params, step + len(draft)))   # the bonus token
    return out
