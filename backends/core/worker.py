"""One instance's worker: a request table, an inbox, the step, and phase hooks.

    worker = DecodeWorker(engine, importer, "decode-0")    # or PrefillWorker / ColocatedWorker
    worker.submit(request, ctx)        # any thread: validated here, once (ValueError if bad)
    worker.cancel(req_id)              # any thread
    for ctx, msg in worker.step(): ... # the step thread: the messages to send, with each
                                       # request's `ctx` (whatever the host answers through)

Lifecycle of a request on any instance: `submit()` (parsed message -> a validated Sequence) ->
inbox -> the step thread enters it in the request table (a duplicate id fails here) and in the
engine -> `accepted()` -> the engine's steps, each output turned into a message by
`on_output()` -> finished, failed or cancelled: out of the table, its blocks freed. The phase
hooks (overridden by PrefillWorker, DecodeWorker, ColocatedWorker):

- `accepted(entry)`: messages when a request enters (a stream's Accepted);
- `before_step()`: work at the step boundary (prefill: reclaim released or expired KV leases;
  decode: take in finished KV copies, admit more);
- `on_output(entry, out, now)`: the message for an engine output (prefill: grant a KV lease);
- `on_cancel(entry)`: free what the request holds (False: not yet, a KV copy is in flight);
- `waits()` / `wait()`: work outside the engine (a KV copy) and how to wait for it when idle.

With a `speculator` (backends/core/spec_policy.py; decode and colocated instances when the
deployment turns speculation on), each step verifies drafts for the decoding sequences and
an output may carry several tokens.

Every failure is a `Failed` message, the last of its request, from every phase.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from backends.core.admission import AdmissionPolicy, Backlog, Overloaded
from backends.core.engine import LLMEngine, StepOutput
from backends.core.messages import Accepted, Failed, Message, Tokens, is_final
from backends.core.scheduler import Batch
from backends.core.sequence import Sequence
from backends.core.speculator import Speculator
from backends.core.tpot_slack import Expected
from backends.core.worker_loop import Inbox

log = logging.getLogger(__name__)
Output = tuple[Any, Message]                # (the request's ctx, the message)


@dataclass(eq=False)
class Entry:
    """One request in an instance's table."""
    req: Any                                 # the request message
    seq: Sequence
    ctx: Any = None
    answered: bool = False                   # its final message is out (prefill: KV still lent)
    lease: int | None = None                 # prefill: the KV lease granted for it
    backlog: int = 0                         # its prompt tokens, while queued for prefill here

    @property
    def req_id(self) -> str:
        return self.seq.req_id


class EngineWorker:
    ROLE: ClassVar[str] = "both"
    REQUEST_TYPES: ClassVar[tuple[type, ...]] = ()

    def __init__(self, engine: LLMEngine, instance_id: str = "", clock=time.monotonic,
                 admission: AdmissionPolicy | None = None, speculator: Speculator | None = None) -> None:
        if engine.config.role != self.ROLE:
            raise ValueError(f"{type(self).__name__} needs an engine with role={self.ROLE!r}")
        self.engine = engine
        self.instance_id = instance_id
        self.clock = clock
        self.requests: dict[str, Entry] = {}         # the step thread's only
        self._inbox = Inbox()
        self.num_requests = 0                        # accepted so far (counted on arrival, with
        #                                              the backlog: the router's count of what
        #                                              reached this instance pairs with it)
        self.num_expected = 0                        # told to expect (split, prefilling elsewhere)
        self.admission = admission or AdmissionPolicy()
        self.backlog = Backlog()                     # prompt tokens queued for prefill here
        self.num_rejected = 0                        # refused as overloaded
        self.running_context = 0                     # the running sequences' tokens, summed
        self.progressed = True                       # the last step did or waited for something
        self.speculator = speculator

    # -- any thread -----------------------------------------------------------------------
    def submit(self, req: Any, ctx: Any = None) -> None:
        """Queue a parsed request. ValueError (nothing queued) if this engine cannot serve it."""
        if not isinstance(req, self.REQUEST_TYPES):
            raise ValueError(f"{type(self).__name__} takes {[t.TYPE for t in self.REQUEST_TYPES]} "
                             f"requests, got {type(req).__name__}")
        entry = Entry(req, self.make_sequence(req, self.clock()), ctx)
        if self.prefills(req):
            try:
                self.admission.check(self.backlog, len(req.prompt_ids), self.instance_id)
            except Overloaded:
                self.num_rejected += 1
                raise
            entry.backlog = len(req.prompt_ids)
            self.backlog.add(entry.backlog)
        self.num_requests += 1
        self._inbox.submit(entry)

    def cancel(self, req_id: str) -> None:
        self._inbox.cancel(req_id)

    def expect(self, req_id: str, sure: int) -> None:
        """`req_id` was routed here and is being prefilled elsewhere (any thread)."""
        self._inbox.expect(req_id, sure)

    def prefills(self, req: Any) -> bool:
        """Whether `req`'s prompt is prefilled here (it then counts in the admission backlog)."""
        return True

    def make_sequence(self, req: Any, now: float) -> Sequence:
        return self.engine.make_sequence(req.req_id, req.prompt_ids, req.params, arrival_time=now)

    # -- the step thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._inbox.empty() or self.engine.has_unfinished() or self.waits()

    def step(self) -> list[Output]:
        out = self._drain_inbox()
        out += self.before_step()
        self.progressed = bool(out)
        if self.engine.scheduler.has_runnable():
            prefilling = self.backlog.requests > 0
            started = self.clock()
            drafts = self.speculator.drafts(self.engine.scheduler.running) \
                if self.speculator and self.engine.scheduler.decodes_next() else None
            step_outs = self.engine.step(started, self.token_budget(), drafts)
            now = self.clock()
            for o in step_outs:
                entry = self.requests[o.req_id]
                self._settle(entry)
                out.append(self._emit(entry, self.on_output(entry, o, now)))
            batch = self.engine.last_batch
            self.progressed |= batch is not None
            if self.speculator and batch is not None:
                self.speculator.observe(batch, step_outs, now - started)
            if prefilling and batch is not None:
                self.backlog.observe(num_prompt_tokens(batch), now - started)
            self.running_context = sum(seq.num_tokens for seq in self.engine.scheduler.running)
        elif self.waits():
            self.wait()
            self.progressed = True                      # it waited for the work outside
        return out

    def _emit(self, entry: Entry, msg: Message) -> Output:
        if is_final(msg):
            entry.answered = True
            if entry.lease is None:
                self.requests.pop(entry.req_id, None)
        return entry.ctx, msg

    def _drain_inbox(self) -> list[Output]:
        out: list[Output] = []
        for op, arg, _ in self._inbox.drain():
            if op == "cancel":
                entry = self.requests.get(arg)
                self.engine.scheduler.expected.pop(arg, None)
                if entry is not None:
                    out += self._cancel(entry)
                continue
            if op == "expect":                  # unless it arrived first
                self.num_expected += 1
                if arg[0] not in self.requests:
                    self.engine.scheduler.expect(Expected(arg[0], arg[1], self.clock()))
                continue
            if arg.req_id in self.requests:
                self._settle(arg)
                out.append((arg.ctx, Failed(arg.req_id, f"request id {arg.req_id!r} is already "
                                                        f"in flight on {self.instance_id}")))
                continue
            self.requests[arg.req_id] = arg
            self.engine.add(arg.seq)
            out += [self._emit(arg, m) for m in self.accepted(arg)]
        return out

    def _settle(self, entry: Entry) -> None:
        """Its prompt is no longer queued work here (prefilled, or it left before)."""
        if entry.backlog:
            self.backlog.done(entry.backlog)
            entry.backlog = 0

    def _cancel(self, entry: Entry) -> list[Output]:
        self._settle(entry)
        if self.speculator:
            self.speculator.forget(entry.req_id)
        if self.on_cancel(entry):
            self.engine.abort(entry.req_id)
        self.requests.pop(entry.req_id, None)
        entry.lease = None
        if entry.answered:
            return []
        entry.answered = True
        return [(entry.ctx, Failed(entry.req_id, "cancelled"))]

    def outstanding(self) -> list[tuple[str, Any]]:
        """(req_id, ctx) of every request not yet answered (the step thread only)."""
        return [(e.req_id, e.ctx) for e in self.requests.values() if not e.answered]

    def fail_all(self, error: str) -> list[Output]:
        """A step failed: end every request with `error` and free what it holds."""
        out = []
        for entry in list(self.requests.values()):
            was_answered = entry.answered
            try:
                self._cancel(entry)
            except Exception:                        # noqa: BLE001 - fail the rest regardless
                log.exception("freeing %s after a failed step", entry.req_id)
            if not was_answered:
                out.append((entry.ctx, Failed(entry.req_id, error)))
        return out

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"queue_depth": s.num_waiting + self._inbox.qsize(), "running": s.num_running,
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": s.num_blocks_total,
                "last_batch_size": s.last_batch_size, "last_batch_tokens": s.last_batch_tokens,
                "requests_total": self.num_requests, "backlog_tokens": self.backlog.tokens,
                "backlog_requests": self.backlog.requests, "prefill_rate": self.backlog.rate,
                "running_context": self.running_context, "rejected_total": self.num_rejected,
                "kv_blocks_cached": s.num_blocks_cached, "prefix_queries": s.prefix.num_queries,
                "prefix_hits": s.prefix.num_hits, "prefix_query_tokens": s.prefix.num_query_tokens,
                "prefix_hit_tokens": s.prefix.num_hit_tokens,
                **(self.speculator.stats() if self.speculator else {})}

    def close(self) -> None:
        if self.speculator:
            self.speculator.close()          # a drafter process of its own: ended and reaped

    # -- phase hooks (the colocated defaults) ---------------------------------------------------
    def accepted(self, entry: Entry) -> list[Message]:
        return [Accepted(entry.req_id, self.instance_id)]

    def before_step(self) -> list[Output]:
        return []

    def on_output(self, entry: Entry, out: StepOutput, now: float) -> Message:
        reason = out.finish_reason.value if out.finish_reason else None
        return Tokens(out.req_id, out.new_token_ids, reason)

    def on_cancel(self, entry: Entry) -> bool:
        return True

    def token_budget(self) -> int | None:
        """This step's token budget (None: the engine's standing one)."""
        return None

    def waits(self) -> bool:
        return False

    def wait(self) -> None:
        pass


def num_prompt_tokens(batch: Batch) -> int:
    """Prompt tokens a step computed: its rows after the decodes, less verify rows (a decode
    row carrying a draft)."""
    rows = zip(batch.seqs[batch.num_decodes:], batch.num_new[batch.num_decodes:])
    return sum(n for seq, n in rows if seq not in batch.drafts)


def with_first_token_timing(msg: Tokens, out: StepOutput, now: float) -> Tokens:
    """A prompt prefilled on this instance: its first token's message carries how it was
    reached (queueing, prefill), as the orchestrator reports TTFT's parts."""
    if out.seq.num_output_tokens != 1:
        return msg
    queue_s, prefill_s = first_token_timing(out.seq, now)
    return Tokens(msg.req_id, msg.token_ids, msg.finish_reason, queue_s, prefill_s)


def first_token_timing(seq: Sequence, now: float) -> tuple[float, float]:
    """(queue_s, prefill_s) of a sequence whose first token came out at `now`: arrival to its
    first step, first step to `now`."""
    started = seq.scheduled_time if seq.scheduled_time is not None else now
    return max(0.0, started - seq.arrival_time), now - started
