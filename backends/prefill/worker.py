"""Prefill instance: batches prompts, runs prefill into an exportable KV pool, lends the KV.

Lifecycle (backends/core/worker.py): the engine's waiting queue (FCFS) -> a prefill batch
under the token budget L_m -> first token sampled, KV blocks kept and lent to decode under a
lease (`exporter.grant`) -> one `Prefilled` message (first token + KV descriptor); the request
stays in the table while its KV is lent -> decode copies the blocks and releases the lease (or
it expires, or the request is cancelled) -> the blocks are freed at the start of a later step
(with prefix caching, full ones stay cached: a later prompt with the same start reuses them; a
lease owns its blocks alone, so a prompt whose cached prefix is lent under another lease takes
copies of those blocks, made before its prefill step, instead of sharing them).
"""
from __future__ import annotations

import time

from backends.core.admission import AdmissionPolicy
from backends.core.engine import LLMEngine, StepOutput
from backends.core.messages import Message, Prefilled, PrefillRequest
from backends.core.worker import EngineWorker, Entry, Output, first_token_timing
from kvtransfer import KVExporter


class PrefillWorker(EngineWorker):
    ROLE = "prefill"
    REQUEST_TYPES = (PrefillRequest,)

    def __init__(self, engine: LLMEngine, exporter: KVExporter, instance_id: str = "",
                 clock=time.monotonic, admission: AdmissionPolicy | None = None) -> None:
        super().__init__(engine, instance_id, clock, admission)
        self.exporter = exporter
        self._lease_to_req: dict[int, str] = {}

    def accepted(self, entry: Entry) -> list[Message]:
        return []                                       # one answer, no stream

    def on_output(self, entry: Entry, out: StepOutput, now: float) -> Message:
        queue_s, prefill_s = first_token_timing(out.seq, now)
        first = out.new_token_ids[0]
        if out.finished:
            return Prefilled(out.req_id, first, self.instance_id, out.finish_reason.value,
                             queue_s=queue_s, prefill_s=prefill_s)
        block_ids, num_tokens = self.engine.export_kv(out.req_id)
        desc = self.exporter.grant(block_ids, num_tokens, now=self.clock())
        entry.lease = desc.lease_id
        self._lease_to_req[desc.lease_id] = out.req_id
        return Prefilled(out.req_id, first, desc.instance_id, None, desc, out.seq.params.seed,
                         queue_s, prefill_s)

    def before_step(self) -> list[Output]:
        """Free the blocks of leases decode released, and of those that expired."""
        for lease in self.exporter.collect_released() + self.exporter.expire(self.clock()):
            req_id = self._lease_to_req.pop(lease, None)
            if req_id is not None:
                self.requests.pop(req_id, None)
                self.engine.release(req_id)
        return []

    def on_cancel(self, entry: Entry) -> bool:
        if entry.lease is not None:
            self.exporter.revoke(entry.lease)
            self._lease_to_req.pop(entry.lease, None)
        return True

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "leases": len(self._lease_to_req)}

    def close(self) -> None:
        self.exporter.close()
