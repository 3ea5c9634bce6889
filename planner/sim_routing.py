"""The simulator's adaptive mode: every request is routed by `backends.core.router.route`, the
function the orchestrator calls, on `InstanceState.from_scheduler` of each simulated instance.

Lifecycle of a request (as planner/simulator.py, plus the router):
arrival -> the held queue (FIFO) -> routed when it reaches the head:
- "split": the chosen prefill instance's waiting queue -> prefill -> first token -> KV hand-off
  to the decode instance the router chose (its remote queue, as pure split);
- "local": the chosen decode instance's waiting queue; its scheduler runs in chunked mode, so
  the prompt is prefilled in chunks inside the decode steps and yields its first token after
  its last chunk, then decodes there;
- "wait": no option is possible (no decode instance has KV for prompt + max_tokens, and no
  prefill instance has KV for the prompt while no decode instance can take it locally). The
  request stays at the head of the held queue, and later arrivals queue behind it (FIFO, as
  the schedulers' admission: a long request is not starved by short ones). The queue is routed
  again whenever the state that made it wait changes: a request finishes (its decode KV
  reservation and batch slot are released) or a prefill instance frees a prompt's blocks (its
  KV copy to decode has ended). Nothing else frees KV, so nothing else can turn a wait into an
  option.

KV reservations: a decode instance reserves prompt + max_tokens blocks for every request the
router prefills there (local), from routing to finish. The free_kv_blocks it publishes is
InstanceState.from_scheduler's, lowered to its capacity less those reservations, so two local
decisions in a row never count the same blocks and a local sequence is never preempted by its
own growth. A split request reserves nothing on decode: the decode instance pulls its KV from
the prefill instance's pool when it has room (pull-based admission), as the servers do.

Chunk budget: at every step boundary of a decode instance with prompt tokens to prefill, the
step's token budget (EngineLimits.max_num_batched_tokens, which the chunked policy spends on
the running decodes first, one token each, then on prompt chunks) is set to its decoding
sequences + `backends.core.router.chunk_budget` of its state with exactly the sequences this
step decodes: the budget the router gave the request at routing time, re-derived with the same
function as the batch changes (a split request's KV admitted after the decision makes the chunk
smaller, so the TPOT holds). The router's own budget also counts sequences still loading or
queued for KV, which is not conservative with a fitted model whose per-sequence cost drops at
its batch-size threshold (docs/profile_cpu.json: in a mixed step, which pays the decodes'
marginal cost, 4 decodes are priced above 5), so the step's budget is taken on the step's own
decodes. At least one token per step, so a lone prompt always progresses. That rule is
`backends.core.router.step_budget`, which the real decode instance calls before each step too.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from backends.core.limits import EngineLimits
from backends.core.router import SLO, Decision, InstanceState, route, step_budget
from backends.core.tpot_slack import Expected, plain_steps
from backends.core.scheduler import Batch, Scheduler
from planner.router_latency import LatencyModelPredictor, PhasePredictor
from planner.sim_records import Record

if TYPE_CHECKING:
    from planner.simulator import Simulator, _Engine


def step_limits(limits: EngineLimits, num_tokens: int) -> EngineLimits:
    """`limits` with a step token budget of `num_tokens`. Not through the constructor: its
    check (a budget of at least max_num_seqs, so that any full batch's decodes fit) is for an
    engine's standing limit; a step's budget of its decodes + a chunk fits them by construction."""
    step = copy.copy(limits)
    object.__setattr__(step, "max_num_batched_tokens", num_tokens)
    return step


class Routing:
    """The router's side of one adaptive simulation (owned by a Simulator)."""

    def __init__(self, sim: Simulator, slo: SLO) -> None:
        self.sim, self.slo = sim, slo
        self.held: deque[Record] = deque()
        self.pending = False                        # a re-route is scheduled
        self.skipped = 0                            # decode rows left out of a step (see schedule)
        self.target: dict[int, _Engine] = {}        # split requests: their decode instance
        self.reserved: dict[int, int] = {}          # decode KV pool (id) -> blocks reserved
        self.holds: dict[int, tuple[int, int]] = {}  # request -> (pool, blocks)
        self.names = {self._name(e): e for e in sim.prefills + sim.decodes}
        pre, dec = sim.config.prefill.latency, sim.config.decode.latency
        self.predictor = PhasePredictor(LatencyModelPredictor(pre), LatencyModelPredictor(dec))
        self.decode_predictor = self.predictor.decode
        # as the dispatcher of a deployment whose prefill and decode instances share cores
        self.prefer_local = sim.config.num_shared_decode > 0

    @staticmethod
    def _name(e: _Engine) -> str:
        return f"{e.role}_{e.index}"

    # ---- states ---------------------------------------------------------------------------
    @staticmethod
    def _tokens_per_step(e: _Engine) -> float:
        return e.spec.speculation.tokens_per_step if e.spec.speculation else 1.0

    def decode_state(self, e: _Engine) -> InstanceState:
        state = InstanceState.from_scheduler(
            self._name(e), "decode", e.scheduler, tpot_slo=self.slo.tpot, now=self.sim.now,
            plain=plain_steps(e.scheduler, self.decode_predictor), tokens_per_step=self._tokens_per_step(e))
        unreserved = e.blocks.num_blocks - self.reserved.get(id(e.blocks), 0)
        return replace(state, free_kv_blocks=max(0, min(state.free_kv_blocks, unreserved)))

    def states(self) -> tuple[list[InstanceState], list[InstanceState]]:
        pre = [InstanceState.from_scheduler(self._name(e), "prefill", e.scheduler)
               for e in self.sim.prefills]
        return pre, [self.decode_state(e) for e in self.sim.decodes]

    # ---- routing --------------------------------------------------------------------------
    def arrive(self, rec: Record) -> None:
        self.held.append(rec)
        self.reroute()

    def reroute(self) -> None:
        """Route the held requests in arrival order until one must wait."""
        while self.held:
            rec = self.held[0]
            decision = route(rec.req.prompt_len, rec.req.output_len, self.slo, *self.states(),
                             self.predictor, prefer_local=self.prefer_local)
            if decision.chosen is None:
                return
            self.held.popleft()
            self._dispatch(rec, decision)

    def _dispatch(self, rec: Record, decision: Decision) -> None:
        sim, chosen = self.sim, decision.chosen
        rec.route, rec.routed_at, rec.decision = chosen.kind, sim.now, decision
        dst = self.names[chosen.decode]
        if chosen.kind == "local":
            blocks = dst.spec.blocks_for(rec.req.prompt_len + rec.req.output_len)
            self.reserved[id(dst.blocks)] = self.reserved.get(id(dst.blocks), 0) + blocks
            self.holds[rec.req.req_id] = (id(dst.blocks), blocks)
            if self.reserved[id(dst.blocks)] > dst.blocks.num_blocks:
                raise RuntimeError(f"{chosen.decode}: the router overcommitted its KV")
        engine, seq = dst, sim._sequence(rec)
        if chosen.kind == "split":                 # the decode instance is told at once
            self.target[rec.req.req_id] = dst
            dst.scheduler.expect(Expected.of(seq.req_id, seq.params, sim.now))
            engine = self.names[chosen.prefill]
        engine.scheduler.add(seq)
        sim._poke(engine)

    def decode_for(self, req_id: int) -> _Engine:
        """The decode instance a split request's KV goes to (the router's choice)."""
        return self.target.pop(req_id)

    def changed(self) -> None:
        """KV or a batch slot was freed: route the held requests again once the current event
        is done (not inside a step's update)."""
        if self.held and not self.pending:
            self.pending = True
            self.sim._at(self.sim.now, self._rerouted)

    def _rerouted(self) -> None:
        self.pending = False
        self.reroute()

    def finished(self, rec: Record) -> None:
        pool, blocks = self.holds.pop(rec.req.req_id, (None, 0))
        if pool is not None:
            self.reserved[pool] -= blocks
        self.changed()

    # ---- a decode instance's step -----------------------------------------------------------
    def schedule(self, e: _Engine, now: float, drafts: dict | None = None) -> Batch | None:
        """The decode instance's scheduler, its step budget set to its decodes + the chunk
        budget (speculating: with the verify rows' yield; `drafts`, as the served instance's)."""
        s = e.scheduler
        decoding = [q for q in s.running if q.num_cached >= q.num_prompt_tokens]
        budget = step_budget(s, self.decode_predictor, self.slo.tpot, now=now,
                             tokens_per_step=self._tokens_per_step(e))
        batch = s.schedule(now, budget, drafts)
        # a decoding sequence behind a part-way prompt in `running` (its KV arrived after the
        # prompt was admitted) gets no token when the prompt's chunk takes the rest of the budget
        seqs = set(batch.seqs) if batch else set()
        self.skipped += sum(q not in seqs and q in s.running for q in decoding)
        return batch
