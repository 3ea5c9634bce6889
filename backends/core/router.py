"""Request router: where one request is prefilled and decoded (pure policy: no Triton, no clock).

Each instance publishes an `InstanceState` (its queued prompts, running batch and free KV; the
real instances and the planner's simulator build it from their own `Scheduler` with
`InstanceState.from_scheduler`). For each arriving request the caller (the orchestrator, the
simulator) calls `route(prompt_len, max_tokens, slo, prefill_states, decode_states, predictor)`
and gets a `Decision`: prefill on prefill instance i then decode on decode instance j ("split"),
prefill on decode instance j as chunks inside its decode steps ("local", with the chunk budget
its steps are to use), or hold the request and route it again later ("wait"). The decision
lists every option considered with its predicted TTFT / TPOT and a reason; `to_dict()` is what
goes into the request's timing. Step times come from the `predictor` passed in: the planner's
fitted model through `planner.router_latency.LatencyModelPredictor` (backends never imports
the planner).

Predictions (seconds):
- split (i, j): TTFT = the prefill of i's queued prompts (one batch of equal shares) + this
  prompt's prefill; TPOT = j's decode step with this sequence added. j is, for every i, the
  decode instance with blocks free for prompt + max_tokens and the lowest such TPOT (a full
  batch queues it for a slot, as the decode instances' pull-based admission does today).
- local on j: every mixed step of j carries up to `chunk_budget` prompt tokens, the most that
  keeps the step within the TPOT SLO (whether or not a batch is running: a sequence may join
  at any step) plus the running sequences' banked slack (below); TTFT = the mixed steps that
  prefill j's queued local tokens and this prompt (the first of them spends the slack, the
  rest have none); TPOT = the worse of a slack-free such step and j's decode step with this
  sequence added.
- A prompt's chunks are priced after the tokens cached before them (its prefix-cache hit, its
  own earlier chunks): attention runs over them, the quadratic term of the prefill model. A
  later turn's 130 new tokens after 800 cached ones cost 1.7x a cold chunk on the AMD host.

TPOT is a mean over a request's output (client.bench.metrics.tpot), so a decoding sequence
whose steps so far were faster than its SLO has banked the difference: slack = SLO x (tokens
out - 1) - time since its first token. One step may take up to SLO x yield + the least slack
of the running sequences and every one of them still meets its TPOT even if it ended right
after (backends/core/tpot_slack.py: SLACK_SHARE of it, a margin for the prediction, and at most
one more TPOT SLO: a request may join during the step unseen, see MAX_SLACK_SLOS). One that ran slower
than its SLO so far has a deficit instead: the next step is held that much under the SLO (at
most DEFICIT_SLOS of it), which puts it back on its SLO, so a batch whose mixed steps ran over
their prediction takes fewer prompt tokens; the router predicts a local prefill there after
that step (or after plain decode steps, where the deficit leaves no room for a prompt token).
A long prompt is then prefilled in larger chunks while the batch has slack, where a per-step
bound would cut it into many small ones. A sequence sure to produce more tokens (ignore_eos:
the benchmarks; min_tokens) is held to its SLO at its end instead: its later steps, if plain,
leave a margin under the SLO it may lend to a step now (half of what is left each time, see
`tpot_slack`), so a decode instance can prefill a whole prompt in one step, as a colocated
one does, where the TPOT averaged over the output allows it. (The router's prediction of a
local prefill's later steps still assumes per-step-bound steps; with later tokens counted
they are larger while the spare lasts and shrink towards plain steps after it.) A sequence
waiting to join (its KV on the way) has banked nothing: while one is there, steps keep the
per-step bound, unless it too is sure of later tokens (then its spare counts, its wait so
far against it). One that arrives during a long step waits for it, as behind any mixed
step.

With `hits` (instance -> prompt tokens its prefix cache likely holds: the orchestrator's
backends.core.cache_affinity guess), an option prefills only the rest of the prompt there,
so a conversation's next turn goes where its history is cached unless that instance is
loaded enough to lose the advantage. (KV is still counted for the whole prompt: a hit shares
blocks that may be evicted by the time the prompt runs.)

A decode instance's measured `recent_step_s`, when published, stands in for the predicted time
of its current batch: every prediction there is shifted by (measured - predicted). A prefill
instance's measured `prefill_rate` (prompt tokens a second at the margin, from its recent
steps) scales a split option's predicted TTFT by how much slower (or faster) than the latency
model it prefills: a prefill instance sharing its core with a decode instance ran about half
the model's speed (served, multi-turn, 12-16 users: split options predicted 1.2-1.9 s, measured
2.8-3.9 s p50). With
speculative decoding a step verifies drafts: it costs more (the measured step time carries
that) and gives each sequence `tokens_per_step` tokens on average, so its TPOT is the step's
time divided by that yield (and a mixed step may take up to TPOT SLO x yield).

Each instance's measured `ttft_bias_s` (the orchestrator's Dispatcher.observe: the median of
first token minus prediction over the prompts recently prefilled there) is added to the TTFT
of every option that prefills there: served, a split prediction ran 0.1 s late at the median
(the prefill batch grows after routing, the prefill core is shared with the server's own
threads), a local one 0.05 s, so uncorrected the router leaned to split.

Rule: among the options meeting both SLOs, the lowest predicted TTFT (the most TTFT margin;
local's TPOT is held under its SLO by the chunk budget), counting a local option only if it is
cheap: its queued prompts and this one fit in one mixed step. A local prefill over several
steps is taken only when no split meets both SLOs, or when it needs at most FEW_LOCAL_STEPS
steps and comes LOCAL_MARGIN of the TTFT SLO sooner than the best of those: each of its steps
spends the running batch's slack on a prediction, and requests prefilling elsewhere join
behind those steps (served, summarization: 2,000-token prompts prefilled locally in long
mixed steps while a split met TTFT made 15% of requests miss TPOT; adaptive 0.6 rps against
split's 0.8; the decode instance has since learnt of split requests at routing time). With
`prefer_local`, the lowest local one if any meets both (a deployment whose prefill instance
shares its cores with a decode instance: a split there runs on cores that also decode, two
processes the OS time-slices, which no prediction here sees); if none meets both, the least bad:
lowest max(TTFT / TTFT SLO, TPOT / TPOT SLO). Ties go to the earlier option: every split
before every local, instances in the order given. KV is never overcommitted: an option needs
blocks for the prompt free on its prefill instance (split: decode pulls the KV when it has
room for it, so a decode instance without room only delays its admission) or for prompt +
max_tokens on its decode instance (local); with neither, "wait".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Mapping, Protocol, Sequence

from backends.core.tpot_slack import plain_steps, scheduler_slack


class Predictor(Protocol):
    """Step times in seconds. DistServe's Appendix A form depends on the batch only through
    these arguments: prefill a + b*sum(l) + c*sum(l^2), decode a + b*sum(ctx) + c*B."""

    def prefill_time(self, prompt_lens: Sequence[int], prefix: int = 0) -> float:
        """Each of `prompt_lens` new tokens after `prefix` tokens already in the cache."""

    def decode_step_time(self, num_seqs: int, total_context: int) -> float: ...

    def mixed_step_time(self, num_seqs: int, total_context: int, chunk_tokens: int,
                        prefix: int = 0) -> float:
        """A decode step of `num_seqs` sequences that also prefills `chunk_tokens` prompt tokens
        after `prefix` cached ones (non-decreasing in `chunk_tokens` and `prefix`)."""


class SLO(Protocol):                # planner.rate_search.SLO is one
    @property
    def ttft(self) -> float: ...

    @property
    def tpot(self) -> float: ...


@dataclass(frozen=True)
class InstanceState:
    """What one instance publishes about itself."""
    instance: str
    phase: Literal["prefill", "decode"]
    free_kv_blocks: int                 # neither held nor promised to a sequence queued for KV
    queued_tokens: int = 0              # prompt tokens accepted, not yet prefilled
    queued_requests: int = 0            # the prompts they belong to
    num_running: int = 0                # sequences in (or admitted to) the decode batch
    running_context: int = 0            # their context lengths, summed
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048  # tokens per step
    local_prefill: bool = False         # a decode instance running mixed (chunked) steps
    recent_step_s: float | None = None  # decode: measured time of its recent steps
    prefill_rate: float | None = None   # prefill: measured marginal prompt tokens a second
    tokens_per_step: float = 1.0        # decode: tokens a sequence gets per step (speculation)
    step_slack_s: float = 0.0           # decode: how much over TPOT SLO x yield its next step may
    #                                     take (negative: how much under, a batch behind its SLO)
    ttft_bias_s: float = 0.0            # measured: how much later than predicted the first tokens
    #                                     of recent prompts prefilled here came (the orchestrator's
    #                                     Dispatcher.observe); added to each prediction there

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be prefill or decode, got {self.phase!r}")
        for name in ("free_kv_blocks", "queued_tokens", "queued_requests", "num_running",
                     "running_context", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < (1 if name in ("block_size", "max_num_seqs") else 0):
                raise ValueError(f"{self.instance}: bad {name} {getattr(self, name)!r}")
        if not self.tokens_per_step >= 1:
            raise ValueError(f"{self.instance}: bad tokens_per_step {self.tokens_per_step!r}")
        if self.prefill_rate is not None and not (math.isfinite(self.prefill_rate) and self.prefill_rate > 0):
            raise ValueError(f"{self.instance}: bad prefill_rate {self.prefill_rate!r}")
        for name in ("step_slack_s", "ttft_bias_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{self.instance}: bad {name} {getattr(self, name)!r}")

    def has_kv_for(self, num_tokens: int) -> bool:
        return self.free_kv_blocks >= -(-num_tokens // self.block_size)

    @classmethod
    def from_scheduler(cls, instance: str, phase: Literal["prefill", "decode"], scheduler,
                       recent_step_s: float | None = None, tpot_slo: float | None = None,
                       now: float | None = None, plain: tuple[float, float] | None = None,
                       tokens_per_step: float = 1.0) -> InstanceState:
        """The state of a `backends.core.scheduler.Scheduler` (read, not changed); with
        `tpot_slo` and `now`, a decode instance's running sequences' slack too (`tpot_slack`,
        counting their later tokens with `plain`: `plain_steps`; `tokens_per_step`: speculation's)."""
        s, lim = scheduler, scheduler.config
        prefilling = [*s.waiting, *(q for q in s.running if q.num_cached < q.num_prompt_tokens)]
        decoding = [*(q for q in s.running if q.num_cached >= q.num_prompt_tokens), *s.loading, *s.remote]
        # blocks the queued work will take: remote sequences' prompts, local prompts' rest
        promised = sum(lim.blocks_for(q.num_prompt_tokens) for q in s.remote) + \
            sum(max(0, lim.blocks_for(q.num_tokens) - len(q.block_ids)) for q in prefilling)
        return cls(instance, phase, max(0, s.blocks.num_free - promised),
                   sum(q.num_tokens - q.num_cached for q in prefilling), len(prefilling),
                   len(decoding), sum(q.num_tokens for q in decoding), lim.block_size,
                   lim.max_num_seqs, lim.max_num_batched_tokens,
                   phase == "decode" and lim.chunked_prefill, recent_step_s,
                   tokens_per_step=tokens_per_step,
                   step_slack_s=scheduler_slack(s, tpot_slo, now, plain, tokens_per_step)
                   if phase == "decode" and tpot_slo is not None and now is not None else 0.0)


@dataclass(frozen=True)
class Option:
    kind: Literal["split", "local"]
    prefill: str | None                 # split: the prefill instance
    decode: str | None                  # where it decodes (local: and prefills); None: nowhere
    chunk_budget: int = 0               # local: prompt tokens per mixed step
    ttft_s: float | None = None         # None: not possible (see reason)
    tpot_s: float | None = None
    meets_slo: bool = False
    reason: str = ""
    steps: int = 0                      # local: the mixed steps until its prompt is prefilled
    ttft_bias_s: float = 0.0            # of ttft_s: the instance's measured bias (see InstanceState)


@dataclass(frozen=True)
class Decision:
    chosen: Option | None               # None: wait
    reason: str
    options: tuple[Option, ...]

    @property
    def kind(self) -> str:
        return self.chosen.kind if self.chosen else "wait"

    def to_dict(self) -> dict:
        c = self.chosen
        return {"kind": self.kind, "prefill": c and c.prefill, "decode": c and c.decode,
                "chunk_budget": c.chunk_budget if c else 0, "reason": self.reason,
                "options": [asdict(o) for o in self.options]}


def _shift(d: InstanceState, predictor: Predictor) -> float:
    if d.recent_step_s is None or d.num_running == 0:
        return 0.0
    return d.recent_step_s - predictor.decode_step_time(d.num_running, d.running_context)


def chunk_budget(state: InstanceState, predictor: Predictor, tpot_slo: float,
                 slack: bool = True, prefix: int = 0) -> int:
    """The most prompt tokens one mixed step of `state`'s running batch can carry with the step
    predicted within `tpot_slo` x yield + (with `slack`) its `step_slack_s` (at most the step's
    token budget less a token per running sequence); 0 when not even one token fits. `prefix`:
    the tokens the chunk's prompt has cached before it (its attention runs over them)."""
    shift, n, ctx = _shift(state, predictor), state.num_running, state.running_context
    limit = tpot_slo * state.tokens_per_step + (state.step_slack_s if slack else 0.0)
    lo, hi = 0, state.max_num_batched_tokens - n
    while lo < hi:                      # the largest c in [0, hi] that fits
        mid = (lo + hi + 1) // 2
        if predictor.mixed_step_time(n, ctx, mid, prefix) + shift <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


SPEED_REF_TOKENS = 256                  # the model's marginal rate is taken from 256 to 512 tokens
SPEED_RANGE = (0.25, 8.0)               # a measured slowdown is trusted within this range


def prefill_slowdown(p: InstanceState, predictor: Predictor) -> float:
    """How many times the latency model's time p's prefills take, by its measured marginal rate
    against the model's (1.0 before it has measured one)."""
    if p.prefill_rate is None:
        return 1.0
    n = SPEED_REF_TOKENS
    model_s_per_token = (predictor.prefill_time([2 * n]) - predictor.prefill_time([n])) / n
    if not model_s_per_token > 0:
        return 1.0
    lo, hi = SPEED_RANGE
    return min(hi, max(lo, 1.0 / (p.prefill_rate * model_s_per_token)))


def _judged(option: Option, slo: SLO, why: str) -> Option:
    misses = [name for name, t, limit in (("TTFT", option.ttft_s, slo.ttft),
                                          ("TPOT", option.tpot_s, slo.tpot)) if t > limit]
    return replace(option, meets_slo=not misses,
                   reason=why + (f"; misses {' and '.join(misses)}" if misses else ""))


def _join_tpot(d: InstanceState, prompt_len: int, predictor: Predictor) -> float:
    """d's TPOT once this sequence has joined its batch: its step over its yield."""
    step = predictor.decode_step_time(d.num_running + 1, d.running_context + prompt_len)
    return (step + _shift(d, predictor)) / d.tokens_per_step


def _cached(hit: int) -> str:
    return f"; {hit} prompt tokens cached" if hit else ""


def _bias(state: InstanceState, ttft: float) -> float:
    """`state`'s measured bias, added to a prediction of `ttft` (never below 0)."""
    return max(state.ttft_bias_s, -ttft)


def _biased(bias: float) -> str:
    return f" {bias * 1e3:+.0f} ms (measured bias)" if bias else ""


def _split(p: InstanceState, target: tuple[InstanceState, float] | None, prompt_len: int,
           slo: SLO, predictor: Predictor, hit: int = 0) -> Option:
    if target is None:
        return Option("split", p.instance, None, reason="no decode instance")
    if not p.has_kv_for(prompt_len):
        return Option("split", p.instance, None, reason=f"{p.instance} has no KV free for the prompt")
    n, tokens = max(1, p.queued_requests), p.queued_tokens
    share, extra = divmod(tokens, n)
    wait = predictor.prefill_time([share + 1] * extra + [share] * (n - extra)) if tokens else 0.0
    d, tpot = target
    slow = prefill_slowdown(p, predictor)
    ttft = (wait + predictor.prefill_time([prompt_len - hit], hit)) * slow
    bias = _bias(p, ttft)
    speed = f" at {slow:.2f}x the model's time (measured)" if slow != 1.0 else ""
    return _judged(Option("split", p.instance, d.instance, 0, ttft + bias, tpot, ttft_bias_s=bias),
                   slo, f"prefill behind {tokens} queued tokens{speed}{_biased(bias)}, decode on "
                   f"{d.instance} ({d.num_running} running){_cached(hit)}")


PRICED_STEPS = 256                      # a local prefill's steps priced one by one, at most
FEW_LOCAL_STEPS = 8                     # a local prefill over this many mixed steps at most, and
LOCAL_MARGIN = 0.1                      # this share of the TTFT SLO sooner than the best split or
# one-step option, is taken over it (served, code, Zen 2: a 186-token prompt predicted 0.82 s
# local in 5 steps went split at 1.00 s and got its first token at 1.17 s, past a 1.11 s SLO;
# split predictions there ran 0.1 s late at the median, local ones 0.05 s)


def _local(d: InstanceState, prompt_len: int, max_tokens: int, slo: SLO, predictor: Predictor,
           hit: int = 0) -> Option:
    def impossible(reason: str) -> Option:
        return Option("local", None, d.instance, reason=reason)
    if not d.local_prefill:
        return impossible("no mixed steps on this instance")
    if not d.has_kv_for(prompt_len + max_tokens):
        return impossible("no KV free for it")
    if d.num_running + d.queued_requests >= d.max_num_seqs:     # queued prompts take slots too
        return impossible("decode batch full")
    # the first step spends the running batch's banked slack, or repays its deficit: one step
    # that much under the SLO puts the sequence furthest behind back on it; the rest have none
    # its chunks come after the queued prompts' (priced without their prefixes), after its hit
    ahead, tokens = d.queued_tokens, d.queued_tokens + prompt_len - hit
    first = chunk_budget(d, predictor, slo.tpot, prefix=0 if ahead else hit)
    budget = chunk_budget(d, predictor, slo.tpot, slack=False, prefix=0 if ahead else hit)
    if budget == 0 and tokens > first:
        return impossible("running batch at its TPOT limit")
    shift, n, ctx = _shift(d, predictor), d.num_running, d.running_context
    delay, catch_up = 0.0, 0
    if first == 0:                      # too far behind for a prompt token: plain steps first
        plain = predictor.decode_step_time(n, ctx) + shift
        room = slo.tpot * d.tokens_per_step - plain
        if room <= 0:
            return impossible("running batch at its TPOT limit")
        catch_up = max(1, math.ceil(-d.step_slack_s / room))
        delay, first = catch_up * plain, budget
    # the steps: `first` tokens, then `budget` each, each priced after what precedes it
    ttft, done, steps, size = delay, 0, 0, first
    while done < tokens:
        c = min(size, tokens - done)
        t = predictor.mixed_step_time(n, ctx, c, hit + done - ahead if done >= ahead else 0) + shift
        ttft, done, steps, size = ttft + t, done + c, steps + 1, budget
        if steps == PRICED_STEPS and done < tokens:     # the rest at the last step's price
            more = -(-(tokens - done) // budget)
            ttft, steps, done = ttft + more * t, steps + more, tokens
    step = predictor.mixed_step_time(n, ctx, budget) + shift if budget else 0.0
    # its own TPOT: the slack-free mixed steps of later prompts, or its decode step
    tpot = max(min(step, ttft) / d.tokens_per_step, _join_tpot(d, prompt_len, predictor))
    after = f" after {catch_up} plain step{'s' * (catch_up > 1)}" if catch_up else ""
    bias = _bias(d, ttft)
    return _judged(Option("local", None, d.instance, budget, ttft + bias, tpot, steps=steps,
                          ttft_bias_s=bias), slo,
                   f"{steps} mixed step{'s' * (steps > 1)} of <= {max(first, budget)} tokens{after} "
                   f"beside {n} running (slack {d.step_slack_s * 1e3:.0f} ms){_biased(bias)}{_cached(hit)}")


def route(prompt_len: int, max_tokens: int, slo: SLO, prefill_states: Sequence[InstanceState],
          decode_states: Sequence[InstanceState], predictor: Predictor,
          prefer_local: bool = False, hits: Mapping[str, int] | None = None) -> Decision:
    """Where to run one request of `prompt_len` prompt tokens and up to `max_tokens` outputs;
    `hits`: prompt tokens each instance's prefix cache likely holds (none: no cache)."""
    if prompt_len < 1 or max_tokens < 0:
        raise ValueError(f"bad request: prompt_len {prompt_len}, max_tokens {max_tokens}")
    hits = hits or {}
    if any(not 0 <= n < prompt_len for n in hits.values()):
        raise ValueError(f"cached tokens must be in [0, {prompt_len}), got {dict(hits)}")
    for states, phase in ((prefill_states, "prefill"), (decode_states, "decode")):
        if any(s.phase != phase for s in states):
            raise ValueError(f"{phase}_states holds an instance of another phase")
    # split's decode instance: the best with KV free for the whole sequence now, else the best
    # of all (its admission pulls the KV from prefill's pool once it has room: the prefilled KV
    # waits there, so nothing is overcommitted and the first token is not delayed)
    joins = [(d, _join_tpot(d, prompt_len, predictor)) for d in decode_states]
    roomy = [j for j in joins if j[0].has_kv_for(prompt_len + max_tokens)]
    target = min(roomy or joins, key=lambda j: j[1], default=None)
    options = (*(_split(p, target, prompt_len, slo, predictor, hits.get(p.instance, 0))
                 for p in prefill_states),
               *(_local(d, prompt_len, max_tokens, slo, predictor, hits.get(d.instance, 0))
                 for d in decode_states))
    possible = [o for o in options if o.ttft_s is not None]
    meeting = [o for o in possible if o.meets_slo]
    local = [o for o in meeting if o.kind == "local"]
    if prefer_local and local:
        return Decision(min(local, key=lambda o: o.ttft_s),
                        "meets both SLOs, local preferred, lowest TTFT", options)
    cheap = [o for o in meeting if o.kind == "split" or o.steps == 1]
    if cheap:                           # min keeps the first of equals: the tie rule
        best = min(cheap, key=lambda o: o.ttft_s)
        sooner = [o for o in meeting if 1 < o.steps <= FEW_LOCAL_STEPS and
                  o.ttft_s <= best.ttft_s - LOCAL_MARGIN * slo.ttft]
        if sooner:
            return Decision(min(sooner, key=lambda o: o.ttft_s),
                            "meets both SLOs, a local prefill over a few steps clearly sooner", options)
        return Decision(best, "meets both SLOs, lowest TTFT", options)
    if meeting:
        return Decision(min(meeting, key=lambda o: o.ttft_s),
                        "meets both SLOs only by a local prefill over several steps", options)
    if possible:
        def over(o: Option) -> float:
            return max(o.ttft_s / slo.ttft, o.tpot_s / slo.tpot)
        best = min(possible, key=over)
        return Decision(best, f"no option meets both SLOs; least over ({over(best):.2f}x)", options)
    why = "no decode instance" if not joins else "no instance has KV free for it"
    return Decision(None, why, options)


def step_budget(scheduler, predictor: Predictor, tpot_slo: float,
                recent_step_s: float | None = None, tokens_per_step: float = 1.0,
                now: float | None = None) -> int | None:
    """The token budget of a decode instance's next mixed step: its decoding sequences' tokens
    plus the `chunk_budget` of exactly those sequences (not the ones still loading or queued,
    which this step does not run) with their slack at `now` (none without it), at least 1 so
    a lone prompt progresses, at most the standing budget; None when no prompt is queued or
    part-way (a plain decode step). The real decode instance and the simulator call this
    before each step."""
    s, lim = scheduler, scheduler.config
    if not (s.waiting or any(q.num_cached < q.num_prompt_tokens for q in s.running)):
        return None
    decoding = [q for q in s.running if q.num_cached >= q.num_prompt_tokens]
    state = InstanceState("step", "decode", s.blocks.num_free, num_running=len(decoding),
                          running_context=sum(q.num_tokens for q in decoding),
                          block_size=lim.block_size, max_num_seqs=lim.max_num_seqs,
                          max_num_batched_tokens=lim.max_num_batched_tokens, local_prefill=True,
                          recent_step_s=recent_step_s, tokens_per_step=tokens_per_step,
                          step_slack_s=0.0 if now is None else scheduler_slack(
                              s, tpot_slo, now, plain_steps(s, predictor, recent_step_s),
                              tokens_per_step))
    budget = chunk_budget(state, predictor, tpot_slo, prefix=s.next_chunk_prefix())
    return max(1, min(lim.max_num_batched_tokens, len(decoding) + budget))
