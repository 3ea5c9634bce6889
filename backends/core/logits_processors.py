"""Logits processors: what a sequence's own tokens do to its next-token logits.

Applied to one row's raw logits before the sampler (greedy argmax, or temperature / top_k /
top_p), in this order:
1. repetition_penalty (HF transformers' RepetitionPenaltyLogitsProcessor, TRT-LLM's): every
   token id seen in the prompt or the output so far has its logit divided by the penalty if
   positive, multiplied by it if negative (> 1 discourages repeats).
2. frequency_penalty / presence_penalty (OpenAI's): over the output tokens only,
   logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty.
3. bans, to -inf: every stop token id while fewer than min_tokens tokens are out (as HF's
   MinNewTokensLengthLogitsProcessor does with the EOS ids); the last token of each bad-word
   sequence whose other tokens end the prompt + output so far (HF's NoBadWordsLogitsProcessor),
   a one-token bad word always.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from backends.core.sampling import SamplingParams
from backends.core.sequence import Sequence as Seq


def process_batch(logits: torch.Tensor, seqs: list[Seq],
                  drafts: dict[Seq, list[int]] | None = None) -> torch.Tensor:
    """`logits` [S, V] of `seqs`' sampled rows (1 + len(draft) rows each, a verify row's j-th
    position seeing its first j draft tokens), processed where a sequence's params ask for it;
    the same tensor when none does."""
    if not any(s.params.needs_history for s in seqs):
        return logits
    logits, row = logits.clone(), 0
    for s in seqs:
        draft = drafts.get(s, []) if drafts else []
        if s.params.needs_history:
            for j in range(len(draft) + 1):
                output_ids = s.output_ids + draft[:j] if j else s.output_ids
                logits[row + j] = process_logits(logits[row + j], s.params, s.prompt_ids, output_ids)
        row += len(draft) + 1
    return logits


def process_logits(logits: torch.Tensor, p: SamplingParams, prompt_ids: Sequence[int],
                   output_ids: Sequence[int]) -> torch.Tensor:
    """`logits` [V] (a new tensor when anything applies) for the token after prompt + output."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        score = logits[seen]
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        logits = logits.index_copy(0, seen, score)
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long),
                                minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
        logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
    banned = [t for t in banned_token_ids(p, prompt_ids, output_ids) if t < logits.shape[-1]]
    if banned:
        logits = logits.index_fill(0, torch.tensor(sorted(banned), dtype=torch.long), float("-inf"))
    return logits


def banned_token_ids(p: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> set[int]:
    """The token ids that must not come next (min_tokens, bad words)."""
    banned: set[int] = set()
    if len(output_ids) < p.min_tokens:
        banned.update(p.stop_token_ids)
    for word in p.bad_words_ids:
        prefix = word[:-1]
        if _ends_with(prompt_ids, output_ids, prefix):
            banned.add(word[-1])
    return banned


def _ends_with(prompt_ids: Sequence[int], output_ids: Sequence[int], suffix: Sequence[int]) -> bool:
    """prompt_ids + output_ids ends with `suffix` (without joining the two)."""
    n = len(suffix)
    if n == 0:
        return True
    if n > len(prompt_ids) + len(output_ids):
        return False
    from_output = min(n, len(output_ids))
    if list(output_ids[len(output_ids) - from_output:]) != list(suffix[n - from_output:]):
        return False
    rest = n - from_output
    return rest == 0 or list(prompt_ids[len(prompt_ids) - rest:]) == list(suffix[:rest])
