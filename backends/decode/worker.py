"""Decode instance: admits prefilled requests when it has room, pulls their KV, decodes them
with continuous batching.

Lifecycle of a request: `submit()` -> inbox -> `pending` (FIFO; its KV still sits in the
prefill instance's pool, which is the queue buffer) -> admitted when enough blocks are free:
blocks allocated, KV fetched through the importer (which validates the descriptor and
releases the lease) -> running in the continuous batch, one token per step -> finished,
cancelled, or failed (bad descriptor, lost lease): its blocks are freed either way.
`submit` and `cancel` may be called from any thread; `step` from one thread only.
"""
from __future__ import annotations

import time
from collections import deque

from backends.core.engine import LLMEngine
from backends.core.messages import DecodeOutput, DecodeRequest
from backends.core.worker_loop import Inbox
from kvtransfer import KVDescriptor, KVImporter, KVTransferError


class DecodeWorker:
    def __init__(self, engine: LLMEngine, importer: KVImporter, instance_id: str = "") -> None:
        if engine.config.role != "decode":
            raise ValueError("DecodeWorker needs an engine with role='decode'")
        self.engine = engine
        self.importer = importer
        self.instance_id = instance_id
        self._inbox = Inbox()
        self.pending: deque[tuple[DecodeRequest, KVDescriptor]] = deque()
        self.kv_bytes = 0
        self.kv_seconds = 0.0

    # -- any thread -----------------------------------------------------------------------
    def submit(self, req: DecodeRequest) -> None:
        self._inbox.submit(req)

    def cancel(self, req_id: str) -> None:
        self._inbox.cancel(req_id)

    # -- the step thread ------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._inbox.empty() or bool(self.pending) or self.engine.has_unfinished()

    def step(self) -> list[DecodeOutput]:
        outs = self._drain_inbox()
        outs += self._admit()
        if self.engine.has_unfinished():
            outs += [DecodeOutput(o.req_id, o.new_token_ids, o.finished,
                                  o.finish_reason.value if o.finish_reason else None)
                     for o in self.engine.step()]
        return outs

    def _drain_inbox(self) -> list[DecodeOutput]:
        outs = []
        for op, arg, _ in self._inbox.drain():
            if op == "cancel":
                self._cancel(arg)
                continue
            try:
                desc = KVDescriptor.from_json(arg.kv)
                self.engine.validate_prompt(arg.prompt_ids)
                if desc.num_tokens != len(arg.prompt_ids):
                    raise ValueError(f"KV descriptor holds {desc.num_tokens} tokens, prompt has "
                                     f"{len(arg.prompt_ids)}")
                self.pending.append((arg, desc))
                outs.append(DecodeOutput(arg.req_id, instance_id=self.instance_id))   # accepted
            except ValueError as e:
                outs.append(self._fail(arg.req_id, f"invalid decode request: {e}"))
        return outs

    def _admit(self) -> list[DecodeOutput]:
        outs = []
        while self.pending and self.engine.can_admit(len(self.pending[0][1].block_ids)):
            req, desc = self.pending.popleft()
            try:
                dst = self.engine.add_prefilled(req.req_id, req.prompt_ids, req.first_token_id,
                                                req.params, len(desc.block_ids))
            except ValueError as e:
                self._release_quietly(desc)
                outs.append(self._fail(req.req_id, f"invalid decode request: {e}"))
                continue
            try:
                stats = self.importer.fetch(desc, dst)
            except (KVTransferError, ValueError) as e:
                self.engine.abort(req.req_id)
                self._release_quietly(desc)
                outs.append(self._fail(req.req_id, f"KV hand-off failed: {e}"))
                continue
            self.engine.start_decoding(req.req_id)
            self.kv_bytes += stats.num_bytes
            self.kv_seconds += stats.seconds
            outs.append(DecodeOutput(req.req_id, kv_bytes=stats.num_bytes, kv_seconds=stats.seconds,
                                     instance_id=self.instance_id, admitted_at=time.monotonic()))
        return outs

    def _cancel(self, req_id: str) -> None:
        for item in list(self.pending):
            if item[0].req_id == req_id:
                self.pending.remove(item)
                self._release_quietly(item[1])
        self.engine.abort(req_id)

    def _release_quietly(self, desc: KVDescriptor) -> None:
        try:
            self.importer.release(desc)
        except (KVTransferError, ValueError):
            pass            # the lease is gone already; prefill reclaims on expiry anyway

    def _fail(self, req_id: str, error: str) -> DecodeOutput:
        return DecodeOutput(req_id, finished=True, finish_reason="error", error=error)

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"pending": len(self.pending) + self._inbox.qsize(), "running": s.num_running,
                "kv_blocks_used": s.num_blocks_used, "kv_blocks_total": s.num_blocks_total,
                "last_batch_size": s.last_batch_size, "kv_transfer_bytes": self.kv_bytes,
                "kv_transfer_seconds": self.kv_seconds}

    def close(self) -> None:
        self.importer.close()
