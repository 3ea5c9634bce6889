"""Prefill instance: batches prompts, runs prefill into an exportable KV pool, lends the KV.

Lifecycle of a request: `submit()` -> inbox -> engine waiting queue (FCFS) -> a prefill batch
under the token budget L_m -> first token sampled, KV blocks kept and lent to decode under a
lease (`exporter.grant`) -> the result (first token + KV descriptor) is returned by `step()`
-> decode copies the blocks and releases the lease (or it expires, or the request is
cancelled) -> the blocks are freed at the start of a later step.
`submit` and `cancel` may be called from any thread; `step` from one thread only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from backends.core.engine import LLMEngine
from backends.core.messages import PrefillRequest, PrefillResult
from backends.core.worker_loop import Inbox
from kvtransfer import KVExporter


@dataclass
class PrefillError:
    req_id: str
    error: str


class PrefillWorker:
    def __init__(self, engine: LLMEngine, exporter: KVExporter, clock=time.monotonic) -> None:
        if engine.config.role != "prefill":
            raise ValueError("PrefillWorker needs an engine with role='prefill'")
        self.engine = engine
        self.exporter = exporter
        self.clock = clock
        self._inbox = Inbox(clock)
        self._arrival: dict[str, float] = {}
        self._lease_to_req: dict[int, str] = {}
        self._req_to_lease: dict[str, int] = {}

    # -- any thread -----------------------------------------------------------------------
    def submit(self, req: PrefillRequest) -> None:
        self.engine.validate_prompt(req.prompt_ids)       # fail fast, in the caller's thread
        self._inbox.submit(req)

    def cancel(self, req_id: str) -> None:
        self._inbox.cancel(req_id)

    # -- the step thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._inbox.empty() or bool(self.engine.scheduler.waiting)

    def step(self) -> list[PrefillResult | PrefillError]:
        errors = self._drain_inbox()
        self._reclaim()
        if not self.engine.scheduler.waiting:
            return errors
        start = self.clock()
        outs = self.engine.step()
        elapsed = self.clock() - start
        return errors + [self._result(o, start, elapsed) for o in outs]

    def _drain_inbox(self) -> list[PrefillError]:
        errors = []
        for op, arg, t in self._inbox.drain():
            if op == "cancel":
                self._cancel(arg)
                continue
            try:
                self.engine.add_request(arg.req_id, arg.prompt_ids, arg.params)
                self._arrival[arg.req_id] = t
            except ValueError as e:
                errors.append(PrefillError(arg.req_id, str(e)))
        return errors

    def _result(self, out, start: float, elapsed: float) -> PrefillResult:
        seq_params = self.engine.seqs[out.req_id].params if out.req_id in self.engine.seqs else None
        queue_s = start - self._arrival.pop(out.req_id, start)
        first = out.new_token_ids[0]
        if out.finished:
            return PrefillResult(out.req_id, first, True, out.finish_reason.value,
                                 prefill_s=elapsed, queue_s=queue_s)
        block_ids, num_tokens = self.engine.export_kv(out.req_id)
        desc = self.exporter.grant(block_ids, num_tokens, now=self.clock())
        self._lease_to_req[desc.lease_id] = out.req_id
        self._req_to_lease[out.req_id] = desc.lease_id
        return PrefillResult(out.req_id, first, False, None, desc.to_json(), seq_params.seed,
                             desc.instance_id, prefill_s=elapsed, queue_s=queue_s)

    def _reclaim(self) -> None:
        for lease in self.exporter.collect_released() + self.exporter.expire(self.clock()):
            req_id = self._lease_to_req.pop(lease, None)
            if req_id is not None:
                self._req_to_lease.pop(req_id, None)
                self.engine.release(req_id)

    def _cancel(self, req_id: str) -> None:
        lease = self._req_to_lease.pop(req_id, None)
        if lease is not None:
            self.exporter.revoke(lease)
            self._lease_to_req.pop(lease, None)
            self.engine.release(req_id)
        else:
            self.engine.abort(req_id)
        self._arrival.pop(req_id, None)

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"queue_depth": s.num_waiting + self._inbox.qsize(), "leases": len(self._req_to_lease),
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": s.num_blocks_total,
                "last_batch_size": s.last_batch_size, "last_batch_tokens": s.last_batch_tokens}

    def close(self) -> None:
        self.exporter.close()
