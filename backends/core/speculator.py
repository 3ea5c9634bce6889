"""An instance's speculative decoding as its worker drives it (the deployment's
decode.speculative): `Speculator.drafts()` before each step asks `AdaptiveK` (spec_policy.py)
which sequences may pay, asks its `DraftSource` for their proposals and cuts them to the lengths
that maximise expected tokens per second; the engine verifies them (LLMEngine.step(drafts=...));
`observe()` after the step tells the source the new tokens and feeds back what was accepted and
what the step cost. The source is a drafter (spec_decode.py) run in the step (`InProcess`), or
one in a process of its own (backends/draft: decode.draft_devices). A costly drafter (a draft
model) is timed apart from the step, and calibrated when the Speculator starts.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from backends.core.sequence import Sequence
from backends.core.spec_decode import DRAFTERS, Drafter, SpecStats
from backends.core.spec_policy import AdaptiveK
from backends.core.spec_sources import DraftSource, InProcess

if TYPE_CHECKING:
    from backends.core.engine import StepOutput
    from backends.core.scheduler import Batch

YIELD_ALPHA = 0.1                 # the weight of one step in the tokens_per_step EWMA


class Speculator:
    """An instance's speculative decoding, as its worker drives it: `drafts()` before each step
    (the decoding sequences' drafts, sized by AdaptiveK), `observe()` after it (what was
    accepted and what the step cost), `forget()` when a request leaves, `close()` at the end."""

    def __init__(self, drafter: Drafter | DraftSource, policy: AdaptiveK,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`drafter`: a DraftSource, or a Drafter to run in-process. `clock`: times drafting."""
        self.clock = clock
        self._drafting_s = 0.0                   # the last drafts() call's drafting time
        self.source = drafter if isinstance(drafter, DraftSource) else InProcess(drafter)
        self.scored = bool(getattr(self.source, "scored", False))
        self.policy = policy
        self._evidence: dict[str, int] = {}     # the last drafts' scores, for observe
        self.counts = SpecStats()
        self.num_steps = 0                       # steps that verified at least one draft
        self.tokens_per_step = 1.0               # EWMA: tokens a decoding sequence gets a step
        # a costly drafter (a draft model) is timed now, not on a real sequence's first call
        # (a prompt's prefill in a decode step, before the policy knows what that costs)
        for k, seconds, backlog in getattr(self.source, "calibrate", lambda k, clock: [])(policy.config.max_k, clock):
            policy.observe_drafting(k, seconds, backlog)

    def drafts(self, running: Iterable[Sequence]) -> dict[str, list[int]]:
        # decoding next, and not under penalties or bans: those depend on each position's
        # history (verify applies them per position, correctly, but drafts there rarely pay)
        seqs = [s for s in running if s.num_tokens - s.num_cached == 1 and not s.params.needs_history]
        if not seqs:
            return {}
        want = self.policy.want([s.req_id for s in seqs], scored=self.scored,
                                num_tokens={s.req_id: s.num_tokens for s in seqs})
        wanted = [(s, k) for s in seqs if (k := want.get(s.req_id))]
        if self.policy.draft_token_s is None and not self.scored:
            # not timed yet: one sequence first (a draft model's first call for a sequence
            # prefills its prompt), the least behind (its call times k, not a prefill)
            wanted = sorted(wanted, key=lambda w: self.policy.backlog(w[0].req_id))[:1]
        backlog = self.policy.drafting(s.req_id for s, _ in wanted)
        self.source.update(seqs if self.scored else [s for s, _ in wanted])   # the rest: later
        proposals, self._evidence = {}, {}
        started = self.clock()
        if not self.scored and wanted and (many := getattr(self.source, "draft_many", None)):
            batched = many([s for s, _ in wanted], max(k for _, k in wanted))
            drafted = [(s, k, (d, 0)) for (s, k), d in zip(wanted, batched)]
        else:
            drafted = [(s, k, self.source.draft_scored(s, k) if self.scored else (self.source.draft(s, k), 0))
                       for s, k in wanted]
        self._drafting_s = self.clock() - started if wanted else 0.0
        if wanted:
            self.policy.observe_drafting(max(k for _, k in wanted), self._drafting_s, backlog, len(wanted))
        for s, k, (draft, score) in drafted:
            if not self.scored:
                self.policy.answered(s.req_id, bool(draft))
            if draft:
                proposals[s.req_id] = draft[:k]
                if score:
                    self._evidence[s.req_id] = score
        return self.policy.choose(proposals, len(seqs), self._evidence)

    def observe(self, batch: Batch, outputs: list[StepOutput], seconds: float) -> None:
        live = [o.seq for o in outputs if not o.finished and not o.seq.params.needs_history]
        self.source.update(live if self.scored else [q for q in live if self.policy.asking(q.req_id)])
        drafts = batch.drafts
        if len(batch.seqs) == batch.num_decodes + len(drafts):     # no prompt rows: a clean cost
            self.policy.observe_step(batch.num_tokens, seconds - self._drafting_s)
        self._drafting_s = 0.0
        self.num_steps += bool(drafts)
        emitted = 0
        for out in outputs:
            if out.seq in drafts:
                num_drafted = len(drafts[out.seq])
                emitted += len(out.new_token_ids)
                self.counts.record(num_drafted, len(out.new_token_ids))
                self.policy.record(out.req_id, num_drafted, min(len(out.new_token_ids) - 1, num_drafted),
                                   self._evidence.get(out.req_id, 0))
            if out.finished:
                self.forget(out.req_id)
        if rows := batch.num_decodes + len(drafts):      # the step's yield, for the router
            step_yield = (batch.num_decodes + emitted) / rows
            self.tokens_per_step += YIELD_ALPHA * (step_yield - self.tokens_per_step)

    def forget(self, req_id: str) -> None:
        self.policy.forget(req_id)
        self.source.forget(req_id)

    def close(self) -> None:
        self.source.close()

    def stats(self) -> dict[str, float]:
        c = self.counts
        return {"spec_steps": self.num_steps, "spec_verify_rows": c.num_verify_rows,
                "spec_proposed": c.num_draft_tokens, "spec_accepted": c.num_accepted_tokens,
                "spec_emitted": c.num_emitted_tokens,
                "spec_acceptance_ewma": round(self.policy.acceptance(), 4),
                "tokens_per_step": round(self.tokens_per_step, 4), **self.source.stats()}


def make_speculator(method: str, max_k: int, drafter_options: dict | None = None, **policy_kw) -> Speculator:
    """The speculator a deployment names (PhaseSpec.speculative, num_speculative_tokens;
    `drafter_options`: the drafter's keywords, e.g. NgramDrafter's cross_request)."""
    if method not in DRAFTERS:
        raise ValueError(f"unknown drafter {method!r}; known: {sorted(DRAFTERS)}")
    return Speculator(DRAFTERS[method](**(drafter_options or {})), AdaptiveK(max_k, **policy_kw))
