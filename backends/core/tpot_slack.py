"""TPOT slack: how much longer than the TPOT SLO a decode instance's next step may take with
every sequence it runs still within its SLO (pure policy: no Triton, no clock).

TPOT is a mean over a request's output (client.bench.metrics.tpot), so a decoding sequence
whose steps so far were faster than its SLO has banked the difference, one that ran slower has
a deficit, and one sure to produce more tokens can lend the margin its later plain steps will
leave (`tpot_slack`). The router (backends.core.router) sizes mixed steps and predicts local
prefills with it; the decode instance publishes it; the planner's simulator runs the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class _StepPredictor(Protocol):     # backends.core.router.Predictor is one
    def decode_step_time(self, num_seqs: int, total_context: int) -> float: ...


SLACK_SHARE = 0.8                       # of the banked slack a step may spend
DEFICIT_SLOS = 0.5                      # a batch behind its TPOT SLO: its next step up to this
# many SLOs shorter than the SLO (which makes it up). Without it every mixed step was sized to
# the SLO itself, so a sequence's mean TPOT sat at the SLO and each step that ran over its
# prediction put it past (served, multi-turn chat, 16 users: TPOT p50 86 ms at an 82 ms SLO).
MAX_SLACK_SLOS = 1.0                    # ... and at most this many TPOT SLOs: a step of up to 2
# SLOs. A request may join during the step without this instance knowing of it (a split
# request still prefilling elsewhere): it waits for the step, and the wait counts towards its
# TPOT, which over a short output cannot absorb much. Uncapped, the slack of a long-running
# batch let single steps run for seconds (served, tight TPOT: split requests of 6-15 output
# tokens waited 0.1-0.5 s to join behind a long local prefill and missed a 50 ms TPOT).
IDLE_STEP_SLOS = 50.0                   # nothing decoding, joining or expected: a step may run
# this many TPOT SLOs over the SLO, in effect up to its token budget (2,048 tokens: about 2.4 s
# on one AMD EPYC core), as a colocated instance prefills a whole prompt at once. Held to the
# SLO instead, an idle decode instance cut prompts into ~35-token chunks (served, chatbot at
# the paper's SLO ratios: a 926-token prompt in 27 mixed steps, 2.29 s to its first token
# against a 1.51 s SLO, while the prefill instance's queue grew behind it).
EXPECT_TTL_S = 30.0                     # an expected joiner not arrived by then is dropped (the
#                                         prefill instance's KV lease lasts as long)
FUTURE_GROWTH = 2.0                     # later plain steps priced at this many times the batch
FUTURE_SHARE = 0.5                      # of a sequence's spare its later tokens leave (tpot_slack)


@dataclass(frozen=True)
class Expected:
    """A split request the router sent to this decode instance whose prompt is still being
    prefilled elsewhere: it will join the batch, and the steps until then delay its second
    token. The instance learns of it at routing time (the orchestrator's `expect`), not when
    its KV is ready, so a long mixed step here is held to its spare too."""
    req_id: str
    sure: int                           # output tokens it is sure to produce after its first
    since: float                        # when it was expected (the instance's clock)

    @classmethod
    def of(cls, req_id: str, params, since: float) -> Expected:
        """A split request with sampling `params`."""
        return cls(req_id, sure_after_prefill(params), since)


def sure_after_prefill(params) -> int:
    """`sure_after` for a split request: its first token comes from the prefill instance."""
    return sure_after(params, 1)


def sure_after(params, produced: int) -> int:
    """Output tokens a request with sampling `params` is certain still to produce after
    `produced`: up to max_tokens where nothing can stop it earlier (ignore_eos, no stop ids or
    strings), else up to min_tokens."""
    p = params
    last = p.max_tokens if p.ignore_eos and not p.stop_token_ids and not p.stop else p.min_tokens
    return max(0, last - produced)


def sure_tokens(q) -> int:
    """Output tokens sequence (or `Expected` joiner) `q` is certain still to produce."""
    return q.sure if isinstance(q, Expected) else sure_after(q.params, q.num_output_tokens)


def tpot_slack(seqs, tpot_slo: float, now: float, joining: int = 0,
               plain_step_s: float | None = None, tokens_per_step: float = 1.0,
               joiners=(), later_step_s: float | None = None) -> float:
    """How much longer than `tpot_slo` x its yield the next step may take with each of the
    decoding sequences among `seqs` still within `tpot_slo` on average (over its tokens so far
    and the next) if it ended right after: SLACK_SHARE of the least slack banked; 0 with none
    decoding, or `joining` sequences waiting to join (they banked nothing; neither has a
    sequence without a first-token time yet); at most MAX_SLACK_SLOS x `tpot_slo`. Negative
    when one is behind its SLO (a deficit, joining or not): the step must be that much
    shorter, by at most DEFICIT_SLOS x `tpot_slo`.

    With `plain_step_s` (the batch's predicted plain decode step), a sequence sure to produce
    more tokens (`sure_tokens`) is held to its SLO at its end instead: all it may still spend
    beyond plain steps is its spare = banked + this step's margin (SLO x yield - plain step)
    + its later steps' margins (priced at `later_step_s`, default the plain step; see
    `plain_steps`). A step of plain + FUTURE_SHARE x spare leaves (1 - FUTURE_SHARE) of it, so
    it never runs out while predictions hold, and the next steps shrink towards plain while
    prompts keep coming (a spare at or under 0: plain steps only, until it ends). No
    MAX_SLACK_SLOS bound there: each sequence's own spare bounds the step. The sequences in
    `joiners` (their KV on the way, or `Expected`: still prefilling elsewhere) count with their
    spares, their wait so far against them, where they have later tokens, else as `joining`.
    With `plain_step_s` and nothing decoding, joining or expected: IDLE_STEP_SLOS x `tpot_slo`."""
    y = tokens_per_step
    margin = None if plain_step_s is None else tpot_slo * y - plain_step_s
    later = margin if later_step_s is None or margin is None else tpot_slo * y - later_step_s
    least, spare = None, None
    for q, joiner in (*((q, False) for q in seqs), *((q, True) for q in joiners)):
        if not joiner and (q.num_cached < q.num_prompt_tokens or not q.output_ids):
            continue                    # prefilling: no TPOT yet
        banked = 0.0 if getattr(q, "first_token_time", None) is None else \
            tpot_slo * (q.num_output_tokens - 1) - (now - q.first_token_time)
        steps = 0.0 if margin is None else sure_tokens(q) / y
        if steps > 1:
            mine = banked + margin + (steps - 1) * later
            spare = mine if spare is None else min(spare, mine)
        elif joiner:
            joining += 1
        else:
            least = banked if least is None else min(least, banked)
    slacks = []
    if least is None and spare is None and not joining and margin is not None:
        return IDLE_STEP_SLOS * tpot_slo            # idle: nothing here to hold a step short
    if least is not None:
        slacks.append(max(least, -DEFICIT_SLOS * tpot_slo) if least < 0 else
                      0.0 if joining else min(least * SLACK_SHARE, MAX_SLACK_SLOS * tpot_slo))
    if spare is not None:               # over SLO x yield: plain + share x spare - SLO x yield
        over = FUTURE_SHARE * max(0.0, spare) - margin
        slacks.append(min(over, 0.0) if joining else over)
    return min(slacks, default=0.0)


def scheduler_slack(scheduler, tpot_slo: float, now: float,
                    plain: tuple[float, float] | None = None, tokens_per_step: float = 1.0) -> float:
    """`tpot_slack` of a scheduler's running batch, its sequences waiting for KV (and those it
    expects: `Scheduler.expect`) joining; with
    `plain` (`plain_steps`: this step's plain time, later ones'), their later tokens count."""
    s = scheduler
    if plain is None:
        return tpot_slack(s.running, tpot_slo, now,
                          len(s.loading) + len(s.remote) + len(s.expecting(now)))
    return tpot_slack(s.running, tpot_slo, now, plain_step_s=plain[0], later_step_s=plain[1],
                      tokens_per_step=tokens_per_step,
                      joiners=(*s.loading, *s.remote, *s.expecting(now)))


def plain_steps(scheduler, predictor: _StepPredictor, recent_step_s: float | None = None
                ) -> tuple[float, float]:
    """(the predicted plain decode step of a scheduler's decoding sequences, the plain step
    their later steps are priced at: the batch grown FUTURE_GROWTH-fold, those sequences and
    as many again with their context); with its measured `recent_step_s`, that, and the later
    one scaled alike. A batch grows while prompts keep arriving, and its later plain steps
    with it: priced at today's batch, a sequence's spare came out too large (simulated: a
    split request joined 2 decoding sequences behind a 0.86 s step its spare allowed, then
    decoded beside 5 at 67 ms a step against 38 predicted, and ended 2% over its SLO)."""
    decoding = [q for q in scheduler.running if q.num_cached >= q.num_prompt_tokens]
    n, ctx = len(decoding), sum(q.num_tokens for q in decoding)
    if not n:
        return 0.0, predictor.decode_step_time(1, 1)
    now = predictor.decode_step_time(n, ctx)
    later = predictor.decode_step_time(round(n * FUTURE_GROWTH), round(ctx * FUTURE_GROWTH))
    return (now, later) if recent_step_s is None else (recent_step_s, recent_step_s * later / now)
