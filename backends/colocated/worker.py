"""Colocated instance: one engine runs both phases of its requests, with continuous batching
(the baseline DistServe is measured against). New prompts pre-empt the decode batch for a step,
as in vLLM; with chunked prefill they ride along with it in chunks under the step's token
budget, as in Sarathi-Serve (see backends/core/scheduler.py).

Lifecycle of a request: `submit()` -> inbox -> accepted (an output carrying the instance id,
so the caller can cancel) -> the engine's waiting queue (FCFS) -> prefilled, in one step or in
chunks over several -> the first token, with its queueing and prefill times -> one token per
step -> finished or cancelled: its blocks are freed either way.
`submit` and `cancel` may be called from any thread; `step` from one thread only.
"""
from __future__ import annotations

import time
from dataclasses import replace

from backends.core.engine import LLMEngine, StepOutput
from backends.core.messages import DecodeOutput, GenerateRequest
from backends.core.worker_loop import Inbox


class ColocatedWorker:
    def __init__(self, engine: LLMEngine, instance_id: str = "", clock=time.monotonic) -> None:
        if engine.config.role != "both":
            raise ValueError("ColocatedWorker needs an engine with role='both'")
        self.engine = engine
        self.instance_id = instance_id
        self.clock = clock
        self._inbox = Inbox(clock)
        self._arrival: dict[str, float] = {}        # accepted, no token yet
        self._started: dict[str, float] = {}        # ... and in a step already
        self.num_requests = 0                         # accepted so far

    # -- any thread -----------------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> None:
        self.engine.validate_prompt(req.prompt_ids)       # fail fast, in the caller's thread
        self._inbox.submit(req)

    def cancel(self, req_id: str) -> None:
        self._inbox.cancel(req_id)

    # -- the step thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._inbox.empty() or self.engine.has_unfinished()

    def step(self) -> list[DecodeOutput]:
        outs = self._drain_inbox()
        if not self.engine.has_unfinished():
            return outs
        start = self.clock()
        step_outs = self.engine.step()
        end = self.clock()
        self._note_started(start)
        return outs + [self._output(o, end) for o in step_outs]

    def _drain_inbox(self) -> list[DecodeOutput]:
        outs = []
        for op, arg, t in self._inbox.drain():
            if op == "cancel":
                self._cancel(arg)
                continue
            try:
                self.engine.add_request(arg.req_id, arg.prompt_ids, arg.params)
            except ValueError as e:
                outs.append(DecodeOutput(arg.req_id, finished=True, finish_reason="error",
                                         error=f"invalid request: {e}"))
                continue
            self._arrival[arg.req_id] = t
            self.num_requests += 1
            outs.append(DecodeOutput(arg.req_id, instance_id=self.instance_id))     # accepted
        return outs

    def _note_started(self, start: float) -> None:
        batch = self.engine.last_batch
        if batch is None or len(self._started) == len(self._arrival):
            return
        for seq in batch.seqs:
            if seq.req_id in self._arrival:
                self._started.setdefault(seq.req_id, start)

    def _output(self, o: StepOutput, end: float) -> DecodeOutput:
        out = DecodeOutput(o.req_id, o.new_token_ids, o.finished,
                           o.finish_reason.value if o.finish_reason else None)
        arrival = self._arrival.pop(o.req_id, None)
        if arrival is None:
            return out
        started = self._started.pop(o.req_id, end)          # the first token
        return replace(out, queue_s=started - arrival, prefill_s=end - started)

    def _cancel(self, req_id: str) -> None:
        self.engine.abort(req_id)
        self._arrival.pop(req_id, None)
        self._started.pop(req_id, None)

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"queue_depth": s.num_waiting + self._inbox.qsize(), "running": s.num_running,
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": s.num_blocks_total,
                "last_batch_size": s.last_batch_size, "last_batch_tokens": s.last_batch_tokens,
                "requests_total": self.num_requests}

    def close(self) -> None:
        pass
