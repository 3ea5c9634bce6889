"""Where the orchestrator sends each request: the router's choice over the live instances.

    dispatcher = Dispatcher(prefill_ids, decode_ids, states, live, mode="adaptive",
                            slo=SLOs(4.0, 0.1), predictor=predictor)
    placement = dispatcher.place(prompt_len, max_tokens)   # Placement, or NoInstance
    placement = dispatcher.place(prompt_len, max_tokens, dispatcher.slos(ttft=0.5))  # its own SLO
    placement = dispatcher.place(len(ids), max_tokens, prompt_ids=ids)    # cache-aware (adaptive)
    ... send to placement.prefill / placement.decode ...

`states(instance_id)` returns what the instance last published (`router.InstanceState`, the
monotonic time it was written and, where the page says, how many requests the instance had
received by then; None if it has not published or is stale) and `live(id)` whether the health
monitor counts it up. A request sent to an instance appears in its published state only once
it has arrived there, so what this orchestrator placed and the state does not show yet is
added to it (`recent`); a burst then spreads instead of piling onto the instance that looked
idle a moment ago. For a prefill instance that is the requests past the count it had received
(requests arrive there in the order they were sent); for a decode instance, whose split
requests arrive after their prefill, out of order, those sent after the state was written.
By time alone a prefill instance's page written while a request was still on its way to it
(an idle instance writes one every 50 ms) dropped that request from the count: served, code
at 4.5 rps, two prompts routed split in the same instant were both predicted "behind 0 queued
tokens", and split TTFTs came out 0.2-0.4 s over their predictions.

In adaptive mode the dispatcher also learns how late its predictions run: `observe(placement,
ttft_s)` (or `observed(chunks, ...)` around a request's output) records each routed request's
first-token time against the router's prediction, and the median error of the recent prompts
prefilled on an instance (`ttft_bias`) goes into that instance's state, so the router adds it
to every option that prefills there.

Modes: "split" (DistServe: prefill instance, then decode instance; each the least loaded that
has room), "adaptive" (backends/core/router.route decides split or local prefill on a decode
instance, from the instances' states and the latency model, against the SLOs). Without a
predictor (no latency profile for this model and host) adaptive falls back to split. Pure
policy: no Triton, the clock injected. With an `affinity` (backends.core.cache_affinity: the
instances' prefix caches, guessed from what was placed where) and the prompt's ids, adaptive
mode predicts each option with the prompt tokens its instance likely has cached.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from backends.core.cache_affinity import CacheAffinity
from backends.core.router import Decision, InstanceState, Predictor, route
from backends.core.routing import least_loaded

log = logging.getLogger(__name__)
MODES = ("split", "adaptive")
BIAS_SAMPLES = 32                   # the last this many first tokens of prompts prefilled on an
BIAS_MIN_SAMPLES = 4                # instance (at least this many, none older than BIAS_HORIZON_S)
BIAS_HORIZON_S = 30.0               # give the measured bias of its TTFT predictions (`ttft_bias`)
BIAS_MAX_SLOS = 1.0                 # ... within this many TTFT SLOs either way
Published = tuple[InstanceState, float] | tuple[InstanceState, float, int]
# (state, written at: time.monotonic()[, requests the instance had received by then])


class NoInstance(RuntimeError):
    """No live instance of a phase can take the request."""


@dataclass(frozen=True)
class SLOs:
    ttft: float
    tpot: float


@dataclass(frozen=True)
class Placement:
    kind: Literal["split", "local"]
    decode: str                                      # the decode instance (both kinds)
    prefill: str | None = None                       # split: the prefill instance
    decision: dict[str, Any] | None = None           # adaptive: the router's options and reasons
    predicted_ttft_s: float | None = None            # adaptive: the chosen option's, bias excluded

    @property
    def prefilled_on(self) -> str:
        return self.prefill if self.prefill is not None else self.decode


@dataclass
class _Sent:
    at: float
    instance: str
    n: int                                           # this orchestrator's sends there so far
    tokens: int                                      # prompt tokens it will prefill there (0: none)
    seqs: int                                        # sequences it adds to the decode batch
    context: int


@dataclass
class Dispatcher:
    prefill_ids: Sequence[str]
    decode_ids: Sequence[str]
    states: Callable[[str], Published | None]
    live: Callable[[str], bool]
    mode: str = "split"
    slo: SLOs = SLOs(4.0, 0.1)
    predictor: Predictor | None = None
    prefer_local: bool = False                       # adaptive: see router.route
    affinity: CacheAffinity | None = None            # adaptive: where prompts' prefixes are cached
    clock: Callable[[], float] = time.monotonic
    horizon_s: float = 5.0                           # forget placements older than this
    recent: deque = field(default_factory=deque)
    sent: dict = field(default_factory=dict)         # instance -> requests placed there so far
    errors: dict = field(default_factory=dict)       # instance -> deque of (at, TTFT - prediction)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def slos(self, ttft: float | None = None, tpot: float | None = None) -> SLOs:
        """A request's SLOs: those it gives, the deployment's for the rest."""
        return SLOs(self.slo.ttft if ttft is None else ttft, self.slo.tpot if tpot is None else tpot)

    def place(self, prompt_len: int, max_tokens: int, slo: SLOs | None = None,
              prompt_ids: list[int] | None = None) -> Placement:
        """Where one request runs; `slo`: its own SLOs (default: the deployment's);
        `prompt_ids` (len prompt_len): for the cache affinity."""
        now = self.clock()
        while self.recent and now - self.recent[0].at > self.horizon_s:
            self.recent.popleft()
        prefills = self._live("prefill", self.prefill_ids, now)
        decodes = self._live("decode", self.decode_ids, now)
        hashes, hits = [], {}
        if self.affinity is not None and prompt_ids:
            hashes = self.affinity.hashes(prompt_ids)
            hits = self.affinity.hits(hashes, prompt_len)
        if self.mode == "adaptive" and self.predictor is not None and all(s for _, s in decodes):
            placement = self._route(prompt_len, max_tokens, prefills, decodes, slo or self.slo, hits)
        else:
            placement = self._split(prefills, decodes)
        computes = placement.prefill or placement.decode          # where the prompt is prefilled
        self._remember(placement, prompt_len - hits.get(computes, 0), prompt_len, now)
        if hashes:
            for instance in {placement.prefill, placement.decode} - {None}:
                self.affinity.placed(instance, hashes)
        return placement

    # -- the two policies ---------------------------------------------------------------------
    def _split(self, prefills, decodes) -> Placement:
        if not prefills:
            raise NoInstance("no prefill instance is up")
        p = least_loaded(prefills, lambda x: _load(x[1], "prefill"))[0]
        return Placement("split", least_loaded(decodes, lambda x: _load(x[1], "decode"))[0], p)

    def _route(self, prompt_len: int, max_tokens: int, prefills, decodes, slo: SLOs,
               hits: dict[str, int]) -> Placement:
        decision: Decision = route(prompt_len, max_tokens, slo,
                                   [s for _, s in prefills if s is not None],
                                   [s for _, s in decodes], self.predictor, self.prefer_local, hits)
        chosen = decision.chosen
        if chosen is None:
            if not prefills:
                raise NoInstance("no prefill instance is up, and no decode instance can prefill "
                                 f"this request: {decision.reason}")
            return replace(self._split(prefills, decodes), decision=decision.to_dict())
        return Placement("local" if chosen.kind == "local" else "split", chosen.decode,
                         chosen.prefill, decision.to_dict(), chosen.ttft_s - chosen.ttft_bias_s)

    # -- measured prediction error ------------------------------------------------------------
    def observe(self, placement: Placement, ttft_s: float) -> None:
        """A request placed by the router reached its first token `ttft_s` after placement."""
        if placement.predicted_ttft_s is None or not ttft_s >= 0:
            return
        errors = self.errors.setdefault(placement.prefilled_on, deque(maxlen=BIAS_SAMPLES))
        errors.append((self.clock(), ttft_s - placement.predicted_ttft_s))

    def ttft_bias(self, instance: str, now: float) -> float:
        """The median of the recent errors of predictions for prompts prefilled on `instance`
        (0 with fewer than BIAS_MIN_SAMPLES in the last BIAS_HORIZON_S: an instance the bias
        kept requests away from is predicted afresh), at most BIAS_MAX_SLOS TTFT SLOs."""
        errors = self.errors.get(instance)
        while errors and now - errors[0][0] > BIAS_HORIZON_S:
            errors.popleft()
        if not errors or len(errors) < BIAS_MIN_SAMPLES:
            return 0.0
        bias = statistics.median(e for _, e in errors)
        return max(-BIAS_MAX_SLOS * self.slo.ttft, min(BIAS_MAX_SLOS * self.slo.ttft, bias))

    # -- state ------------------------------------------------------------------------------
    def _live(self, phase: str, ids: Sequence[str], now: float) -> list[tuple[str, InstanceState | None]]:
        """(id, state adjusted by what was sent since it was written) of each live instance."""
        out = []
        for i in ids:
            if not self.live(i):
                continue
            published = self.states(i)
            if published is None:
                out.append((i, None))
                continue
            state = self._adjusted(*published)
            bias = self.ttft_bias(i, now) if self.mode == "adaptive" else 0.0
            out.append((i, replace(state, ttft_bias_s=bias) if bias else state))
        if not out and phase == "decode":
            raise NoInstance("no decode instance is up")
        return out

    def _adjusted(self, state: InstanceState, written_at: float,
                  received: int | None = None) -> InstanceState:
        if state.phase == "prefill" and received is not None:
            sent = [s for s in self.recent if s.instance == state.instance and s.n > received]
        else:
            sent = [s for s in self.recent if s.instance == state.instance and s.at > written_at]
        if not sent:
            return state
        tokens = sum(s.tokens for s in sent)
        seqs = sum(s.seqs for s in sent)
        blocks = sum(-(-(s.context + 1) // state.block_size) for s in sent if s.seqs)
        return replace(state, queued_tokens=state.queued_tokens + tokens,
                       # slack is spent on the prompts sent since; a deficit stays
                       step_slack_s=min(0.0, state.step_slack_s) if tokens else state.step_slack_s,
                       queued_requests=state.queued_requests + sum(1 for s in sent if s.tokens),
                       num_running=state.num_running + seqs,
                       running_context=state.running_context + sum(s.context for s in sent),
                       free_kv_blocks=max(0, state.free_kv_blocks - blocks))

    def _remember(self, placement: Placement, to_prefill: int, prompt_len: int, now: float) -> None:
        def sent(instance: str) -> int:
            self.sent[instance] = self.sent.get(instance, 0) + 1
            return self.sent[instance]
        if placement.prefill is not None:
            self.recent.append(_Sent(now, placement.prefill, sent(placement.prefill), to_prefill, 0, 0))
        local = placement.kind == "local"
        self.recent.append(_Sent(now, placement.decode, sent(placement.decode),
                                 to_prefill if local else 0, 1, prompt_len))


async def observed(chunks: AsyncIterator[Any], dispatcher: Dispatcher,
                   placement: Placement) -> AsyncIterator[Any]:
    """`chunks` (a request's output, backends.orchestrator.pipeline.Chunk), telling `dispatcher`
    how long after its first iteration the first one came. A first chunk that is also the last
    (a request not streamed) came at the end: its timing's `first_token_at` (time.monotonic,
    as `dispatcher.clock` by default) is used, or, without one, nothing is told. Closing this
    closes `chunks`."""
    t0, seen = dispatcher.clock(), False
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if not seen:
                seen = True
                timing = getattr(chunk, "timing", None)
                at = dispatcher.clock() if timing is None else getattr(timing, "first_token_at", None)
                if at is not None:
                    try:
                        dispatcher.observe(placement, at - t0)
                    except Exception:               # bookkeeping: never fail the request
                        log.exception("could not record a first token's time")
            yield chunk


def _load(state: InstanceState | None, phase: str) -> tuple[int, int]:
    """Least-loaded order: an instance that has not published goes last among equals."""
    if state is None:
        return (1 << 62, 0)
    if phase == "prefill":
        return (state.queued_tokens, state.queued_requests)
    return (state.num_running + state.queued_requests, -state.free_kv_blocks)


def adaptive_dispatcher(deployment: Any, control_dir: Any, live: Callable[[str], bool]) -> Dispatcher:
    """The orchestrator's dispatcher for a deployment served in adaptive mode: the instances'
    status pages (backends/core/status_page.py, in the server's run dir) as their states, the
    deployment's SLOs, and the latency profile's predictor (without one, it places as split);
    where a prefill instance's cores are a decode instance's too, local placements first; with
    prefix caching, the cache affinity of the instances that cache."""
    from backends.core.status_page import StatusReader, status_path, to_instance_state
    from planner.router_latency import deployment_predictor
    from deploy.contract import instance_id
    prefill_ids = [instance_id("prefill", i) for i in range(deployment.prefill.num_instances)]
    decode_ids = [instance_id("decode", i) for i in range(deployment.decode.num_instances)]
    readers = {i: StatusReader(status_path(control_dir, i), i) for i in prefill_ids + decode_ids}

    def states(instance: str) -> Published | None:
        try:
            status = readers[instance].read()
            if status is None or status.stale:
                return None
            return (to_instance_state(status), status.written_at,
                    status.requests_total + status.rejected_total)
        except ValueError:                            # a page refused: do not trust it
            return None
    try:
        predictor = deployment_predictor(deployment, deployment.resolved_latency_profile())
    except (OSError, ValueError) as e:
        import logging
        logging.getLogger(__name__).warning("adaptive mode without a latency model (%s): "
                                            "every request is placed as split", e)
        predictor = None
    shared = deployment.prefill.device == deployment.decode.device and \
        bool(deployment.prefill.all_devices() & deployment.decode.all_devices())
    capacity = {i: phase.num_kv_blocks
                for ids, phase in ((prefill_ids, deployment.prefill), (decode_ids, deployment.decode))
                if phase.prefix_caching for i in ids}
    return Dispatcher(prefill_ids, decode_ids, states, live, mode="adaptive",
                      slo=SLOs(deployment.slo_ttft_s, deployment.slo_tpot_s), predictor=predictor,
                      prefer_local=shared,
                      affinity=CacheAffinity(deployment.block_size, capacity) if capacity else None)
