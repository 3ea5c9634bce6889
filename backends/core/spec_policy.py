"""Speculative decoding served: how many draft tokens each decoding sequence verifies.

A decode (or colocated) instance's worker drives a `Speculator` (speculator.py; the deployment's
decode.speculative): before each step `drafts()` asks `AdaptiveK` which sequences may pay,
asks its `DraftSource` for their proposals and cuts them to the lengths that maximise expected
tokens per second; the engine verifies them (LLMEngine.step(drafts=...)); after the step
`observe()` tells the source the new tokens and feeds back what was accepted and what the step
cost (`StepCost`). The source is a drafter (spec_decode.py) run in the step (`InProcess`), or
one in a process of its own (backends/draft: decode.draft_devices) whose ready proposals are
taken without waiting.
k is 0 wherever drafting does not pay by these measurements, apart from a 1-token probe now
and then. A drafter that scores its drafts (the n-gram's match length: `evidence`) is asked
for every sequence each step, and each draft's acceptance is then judged by what drafts of
that evidence have done on this instance (the n-gram drafter keeps each sequence's n-grams
indexed as it grows, so asking costs about 10 us a sequence, not a scan of its history).
`tokens_per_step` (an EWMA of the tokens a decoding sequence gets per step) goes on the
instance's status page, so the router divides a step's time by it to predict TPOT.
Drafting that takes time (a draft model in the step: backends/core/model_drafter.py) is timed
apart from the step (`observe_drafting`; StepCost keeps the target's step alone): the drafter
is asked only while the step's expected tokens per second, drafting included, beat a plain
step's, and its probes are spaced to cost at most PROBE_SHARE of the steps' time. A draft
model's call first computes each asked sequence's backlog (its tokens the drafter has not seen:
a new sequence's whole prompt, an idle one's tokens since it was last asked), so a call is
priced as k x draft_token_s + backlog x backlog_token_s, both learnt from the timed calls: a
probe waits until its own backlog is paid for, and a new or long-idle sequence is asked only
while the drafter pays on the sequences it drafts for every step.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from backends.core.spec_cost import BACKLOG_FREE, DraftingCost, StepCost

EMPTY_ASKS = 4                    # a sequence the drafter had nothing for this often: probes only
UNWEIGHED_MAX_S = 0.01            # a drafting call's seconds allowed before step costs are measured
PROBE_SHARE = 0.05                # a costly drafter's probes: at most this share of the steps' time
# The evidence classes scored drafts' acceptance is kept by (lower bounds of the score) and each
# class's prior acceptance: n-gram drafts on the default model, chatbot, code and summarization
# alike, accepted their first token 47-52% of the time after a 2-token match, 71-79% after 3-4,
# 83-85% after 5-8 and 91-97% after 9 or more (docs/spec_decode.md).
EVIDENCE_PRIORS = {1: 0.3, 2: 0.5, 3: 0.7, 5: 0.8, 9: 0.9}


@dataclass
class _Acceptance:
    accepted: float = 0.0        # discounted draft tokens accepted
    tried: float = 0.0           # ... and tried (accepted + the first rejected one)
    idle: int = 0                # steps since it last verified a draft
    ramp: int = 0                # its last draft was accepted whole: draft this many next
    empty: int = 0               # asks in a row the drafter had no draft for
    length: int = 0              # its tokens now (Sequence.num_tokens; 0: not told)
    drafted: int = 0             # ... at its last drafting call (0: never drafted)

    def add(self, num_drafted: int, num_accepted: int, decay: float, max_k: int = 0) -> None:
        self.accepted = self.accepted * decay + num_accepted
        self.tried = self.tried * decay + num_accepted + (num_accepted < num_drafted)
        self.ramp = min(2 * num_drafted, max_k) if num_accepted == num_drafted else 0

    def rate(self, prior: float, weight: float) -> float:
        return (self.accepted + weight * prior) / (self.tried + weight)


@dataclass(frozen=True)
class PolicyConfig:
    """AdaptiveK's settings: `max_k` (the deployment's num_speculative_tokens), a probe after
    `probe_every` steps left out, the acceptance prior and its weight (in tokens), the decay of
    a sequence's and of the instance's counts per verify row, the least relative gain taken,
    and the weight (in tokens) of a scored draft's evidence class against the sequence's own
    counts."""
    max_k: int = 3
    probe_every: int = 16
    prior_accept: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.8
    instance_decay: float = 0.98
    min_gain: float = 0.02
    evidence_weight: float = 4.0

    def __post_init__(self) -> None:
        if self.max_k < 1 or self.probe_every < 1:
            raise ValueError(f"max_k and probe_every must be >= 1, got {self.max_k}, {self.probe_every}")
        if not (0 <= self.prior_accept <= 1 and self.prior_weight > 0 and 0 < self.decay <= 1
                and 0 < self.instance_decay <= 1 and self.min_gain >= 0 and self.evidence_weight > 0):
            raise ValueError(f"bad speculation policy settings: {self}")


class AdaptiveK:
    """How many draft tokens each decoding sequence verifies in the next step (0: none).

    Acceptance: a sequence's chance a that a draft token is accepted given the ones before it
    were, from discounted counts (`decay` per verify row), shrunk towards the instance's rate
    (itself shrunk towards `prior_accept`). A draft of k tokens then yields 1 + a + ... + a^k
    tokens: its j-th token adds a^j. Cost: StepCost, measured decode steps by rows.
    Choice (`choose`): the proposed draft tokens, best first, are taken while the step's
    expected tokens per second, (B + gains) / T(B + m), beats a plain step's B / T(B) and every
    shorter choice by `min_gain`; the best prefix wins, so a workload whose drafts do not pay
    runs plain steps. `want` asks the drafter only for sequences whose first draft token could
    pay, plus one probe per step: a sequence left out for `probe_every` steps drafts 1 token,
    so text that turns repetitive is picked up; while a left-out sequence's drafts are accepted
    whole, it drafts again next step with twice as many (up to max_k; a ramp, outside the cost
    rule) until its estimate catches up.
    Drafting that takes time (a draft model) is priced per call from two learnt rates, per token
    of k and per backlog token (`observe_drafting`); a probe waits until its own backlog is paid
    for, and a sequence with a large backlog (new, or left out long) is asked only while the
    drafter pays on the sequences it drafts for every step (`want`: `_paying`).
    Scored drafts (`choose(..., evidence=)`, a drafter's confidence such as the n-gram's match
    length) are judged otherwise: the instance keeps acceptance counts per evidence class
    (EVIDENCE_PRIORS: the classes and their priors), and a draft's a is the sequence's counts
    shrunk towards its class's rate with `evidence_weight`. n-gram drafts are bursty (a long
    copied run, then nothing), so a sequence's recent rejections must not shut out the long
    match that follows; `want` then asks for every sequence (the drafter is cheap and its score
    comes with the draft).
    Pure: no clock, no model.
    """

    def __init__(self, max_k: int, cost: StepCost | None = None, **config) -> None:
        """`config`: PolicyConfig's other fields."""
        self.config = PolicyConfig(max_k, **config)
        self.cost = cost or StepCost()
        self.seqs: dict[str, _Acceptance] = {}
        self.instance = _Acceptance()
        self.classes: dict[int, _Acceptance] = {}   # scored drafts' counts by evidence class
        self._forced: dict[str, int] = {}          # want's probe and ramps, for choose
        self.drafting_cost = DraftingCost()         # seconds a drafting call, learnt
        self._paying = True     # the last verdict on the sequences drafted lately: does it pay?

    @staticmethod
    def evidence_class(evidence: int) -> int:
        """The class (an EVIDENCE_PRIORS key: a lower bound) of a draft's evidence; 0: unscored."""
        return max((b for b in EVIDENCE_PRIORS if evidence >= b), default=0)

    def acceptance(self, req_id: str | None = None, evidence: int = 0) -> float:
        """The acceptance estimate of `req_id` (None: of the instance), for a draft scored
        `evidence` (0: unscored)."""
        c = self.config
        pooled = self.instance.rate(c.prior_accept, c.prior_weight)
        seq = self.seqs.get(req_id) if req_id is not None else None
        if not (cls := self.evidence_class(evidence)):
            return pooled if seq is None else seq.rate(pooled, c.prior_weight)
        counts = self.classes.get(cls)
        base = EVIDENCE_PRIORS[cls] if counts is None else counts.rate(EVIDENCE_PRIORS[cls], c.prior_weight)
        return base if seq is None else seq.rate(base, c.evidence_weight)

    def observe_drafting(self, k: int, seconds: float, backlog: int = 0, num_seqs: int = 1) -> None:
        """A step's drafting call (`k`: the most tokens asked of any sequence; `backlog`: the
        tokens of its `num_seqs` sequences the drafter had not seen) took `seconds`
        (DraftingCost.observe). Cheap drafters (n-gram: microseconds) change nothing; a draft
        model's passes are weighed."""
        self.drafting_cost.observe(k, seconds, backlog, num_seqs)

    @property
    def draft_token_s(self) -> float | None:
        return self.drafting_cost.token_s

    @property
    def backlog_token_s(self) -> float | None:
        return self.drafting_cost.backlog_s

    def _drafting_s(self, k: int, backlog: int = 0) -> float:
        """Predicted seconds of a drafting call of `k` tokens a sequence whose sequences bring
        `backlog` unseen tokens (0 while its rates are unmeasured, or while step costs are
        still the unitless prior)."""
        return self.drafting_cost.predict(k, backlog) if self.cost.measured else 0.0

    def backlog(self, req_id: str) -> int:
        """`req_id`'s tokens the drafter has not seen (its whole sequence if never drafted;
        0 where the caller of `want` gave no lengths)."""
        st = self.seqs.get(req_id)
        return max(st.length - st.drafted, 0) if st is not None else 0

    def drafting(self, req_ids: Iterable[str]) -> int:
        """These sequences are in the drafting call now: their backlogs (summed, for
        observe_drafting); from now the drafter has seen them."""
        total = 0
        for r in req_ids:
            if (st := self.seqs.get(r)) is not None:
                total += self.backlog(r)
                st.drafted = st.length
        return total

    def _cold(self, req_id: str) -> bool:
        """Whether asking `req_id` first costs a backlog beyond a step's (new, or left out
        long) that matters: more than min_gain of a step (a drafter process's calls take
        microseconds, whatever the backlog)."""
        backlog = self.backlog(req_id)
        return backlog > max(BACKLOG_FREE, self.config.max_k + 1) and \
            self._drafting_s(0, backlog) > self.config.min_gain * self.cost.estimate(len(self.seqs))

    def _waits(self, req_id: str) -> bool:
        """Whether `req_id` is not asked at all yet: while step costs are still the unitless
        prior (the first steps), a call whose backlog is predicted to take more than
        UNWEIGHED_MAX_S cannot be weighed against them (a draft model's prompt prefill: a code
        request's first steps paid 0.3 s in the draft model before this rule)."""
        return not self.cost.measured and \
            self.drafting_cost.predict(0, self.backlog(req_id)) > UNWEIGHED_MAX_S

    def _drafting_pays(self, b: int, asked: dict[str, int]) -> bool:
        """Whether a step whose `asked` sequences draft (their lengths) beats a plain step of
        `b` rows once the drafting's own time is counted: (b + gains) / (T(rows) + D) against
        b / T(b). Only where drafting takes time (a draft model); the n-gram passes at once.
        D is the steady state's: k's part and each sequence's catch-up as if asked every step
        (at most its k accepted tokens and the target's), not a new or idle sequence's whole
        backlog. That backlog is paid once and repaid by every later step the sequence drafts,
        and one step's gain never repays a prompt's prefill: charged here, it would shut out
        every new sequence for good. Whether to pay it at all is `want`'s (`_paying`)."""
        catch_up = sum(min(self.backlog(r), k + 1) for r, k in asked.items())
        drafting = self._drafting_s(max(asked.values(), default=0), catch_up)
        if not drafting:
            return True
        gains = sum(self.acceptance(r) ** j for r, k in asked.items() for j in range(1, k + 1))
        rows = b + sum(asked.values())
        return (b + gains) / (self.cost.estimate(rows) + drafting) > \
            b / self.cost.estimate(b) * (1 + self.config.min_gain)

    def want(self, req_ids: list[str], scored: bool = False,
             num_tokens: dict[str, int] | None = None) -> dict[str, int]:
        """Draft lengths to ask the drafter for, for the sequences decoding next step (their
        states are kept; any other's dropped). `scored`: the drafter scores its drafts, so
        every sequence is asked for max_k (choose judges each draft by its score).
        `num_tokens`: each sequence's tokens now, for its backlog (None: no backlogs)."""
        c = self.config
        self.seqs = {r: self.seqs.get(r) or _Acceptance() for r in req_ids}
        for r, n in (num_tokens or {}).items():
            if (st := self.seqs.get(r)) is not None:
                st.length = n
        if scored:
            self._forced = {}
            return dict.fromkeys(req_ids, c.max_k)
        b = len(req_ids)
        # a first draft token pays at all if (b + a) / T(b + 1) > b / T(b); whether the
        # step's drafts together gain min_gain is choose's to judge
        threshold = b * self.cost.estimate(b + 1) / self.cost.estimate(b) - b
        out, idle, self._forced = {}, [], {}
        for r, st in self.seqs.items():
            st.idle += 1
            if self._waits(r):
                continue
            if self.acceptance(r) > threshold and st.empty < EMPTY_ASKS:
                out[r] = c.max_k
            elif st.ramp:
                out[r] = self._forced[r] = st.ramp
            elif st.idle > c.probe_every:
                idle.append(r)
        # The sequences drafted for lately (a small backlog) judge the drafter at its steady
        # state; a cold one (new, or left out long: its prompt or idle tokens to compute first)
        # is asked only while they pay, since its pooled acceptance alone says nothing of this
        # drafter on it and its first call may cost a prefill. While it does not pay, cold
        # ones are left to probes, which wait until their backlog is paid for. With no sequence
        # drafted lately (all new), the last verdict stands.
        warm = {r: k for r, k in out.items() if not self._cold(r)}
        if warm:
            self._paying = self._drafting_pays(b, warm)
        elif any(st.drafted and not self._cold(r) for r, st in self.seqs.items()):
            self._paying = False          # drafted lately, and none of them worth asking
        if out and not (self._paying and self._drafting_pays(b, out)):
            # a drafter whose passes cost more than they give (the cold ones' steady state
            # included), or one not paying on the sequences it drafts for; those left out are
            # probed like any other (else an acceptance estimate that passes the threshold
            # while the cost rule says no would never be tested again)
            kept = warm if self._paying and warm else {}
            idle += [r for r in out if r not in kept and self.seqs[r].idle > c.probe_every]
            out, self._forced = kept, {r: k for r, k in self._forced.items() if r in kept}
        # A probe costs a drafting call, its own backlog included: each of the b sequences is
        # probed on its own clock, so each gets 1/b of PROBE_SHARE of the steps' time (a new
        # sequence's probe, a prefill, comes after proportionately many steps, if ever)
        budget = self.cost.estimate(b) * PROBE_SHARE / b
        spent = lambda r: self.seqs[r].idle * budget >= self._drafting_s(1, self.backlog(r))
        probe = max((r for r in idle if spent(r)), key=lambda r: self.seqs[r].idle, default=None)
        if probe is not None:
            out[probe] = self._forced[probe] = 1
        return out

    def choose(self, proposals: dict[str, list[int]], num_rows: int,
               evidence: dict[str, int] | None = None) -> dict[str, list[int]]:
        """The drafts to verify: `proposals` (drafter output for `want`) cut to the lengths
        that maximise expected tokens per second of a step of `num_rows` decode rows.
        `evidence`: each scored draft's score (absent: unscored)."""
        evidence = evidence or {}
        forced = {r: proposals[r] for r in self._forced if proposals.get(r)}
        for r in self._forced.keys() - forced.keys():    # nothing to draft: ask again later
            self.seqs[r].idle, self.seqs[r].ramp = 0, 0
        rate = {r: self.acceptance(r, evidence.get(r, 0)) for r in proposals}
        tokens = num_rows + sum(rate[r] ** j for r, d in forced.items() for j in range(1, len(d) + 1))
        rows = num_rows + sum(map(len, forced.values()))
        gains = [(rate[r] ** j, j, r) for r, draft in proposals.items()
                 if r not in forced for j in range(1, len(draft) + 1)]
        gains.sort(key=lambda g: (-g[0], g[1]))          # a sequence's tokens stay in order
        best_m, best = 0, tokens / self.cost.estimate(rows)
        for m, (gain, _, _) in enumerate(gains, 1):
            tokens += gain
            rate = tokens / self.cost.estimate(rows + m)
            if rate > best * (1 + self.config.min_gain):
                best_m, best = m, rate
        k = Counter(r for _, _, r in gains[:best_m])
        return {**forced, **{r: proposals[r][:n] for r, n in k.items()}}

    def asking(self, req_id: str) -> bool:
        """Whether `req_id` is still asked for drafts every step (not left to probes)."""
        st = self.seqs.get(req_id)
        return st is None or st.empty < EMPTY_ASKS

    def answered(self, req_id: str, has_draft: bool) -> None:
        """Whether the drafter had a draft for `req_id` when asked: after EMPTY_ASKS empty
        answers in a row it is asked only by probes (a drafter process too slow to keep up
        is then told nothing and idles, instead of computing what no step will use)."""
        if (st := self.seqs.get(req_id)) is not None:
            st.empty = 0 if has_draft else st.empty + 1

    def record(self, req_id: str, num_drafted: int, num_accepted: int, evidence: int = 0) -> None:
        """A verify row's outcome (`evidence`: its draft's score; 0: unscored)."""
        c = self.config
        st = self.seqs.get(req_id)
        if st is not None:
            st.add(num_drafted, num_accepted, c.decay, c.max_k)
            st.idle = 0
        self.instance.add(num_drafted, num_accepted, c.instance_decay)
        if cls := self.evidence_class(evidence):
            self.classes.setdefault(cls, _Acceptance()).add(num_drafted, num_accepted, c.instance_decay)

    def observe_step(self, num_rows: int, seconds: float) -> None:
        """A decode step's rows and its measured seconds (drafting excluded: observe_drafting)."""
        self.cost.observe(num_rows, seconds)

    def forget(self, req_id: str) -> None:
        self.seqs.pop(req_id, None)
