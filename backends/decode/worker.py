"""Decode instance: admits prefilled requests when it has room, pulls their KV beside the
running batch, decodes them with continuous batching. With chunked prefill it also takes whole
prompts (`generate`), prefilled here in chunks inside its decode steps under the step's token
budget (adaptive disaggregation: the router sends a prompt here when that keeps both SLOs).

Lifecycle (backends/core/worker.py): accepted -> WAITING_FOR_KV in the scheduler's remote
queue (FIFO; its KV still sits in the prefill instance's pool, which is the queue buffer) ->
admitted by the scheduler when blocks and a batch slot are free (with a prefix cache, the
prompt's leading blocks it holds already are shared, e.g. the conversation's previous turn
decoded here) -> the rest of its KV is copied in by the copy thread (the importer validates
the descriptor and releases the lease; on GPU the copy runs on the importer's own stream),
while the running batch keeps stepping -> at the next step boundary after the copy it joins
the batch (`Admitted`) -> one token per step (with a
speculator, a verified draft per step: 1..k+1 tokens) -> finished,
cancelled, or failed (bad descriptor, lost lease): its blocks are freed either way. A request
cancelled while its copy runs is freed when the copy ends (the copy writes its blocks).
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable

from backends.core.engine import LLMEngine, StepOutput
from backends.core.messages import Admitted, DecodeRequest, Failed, GenerateRequest, Message
from backends.core.tpot_slack import scheduler_slack
from backends.core.scheduler import Scheduler
from backends.core.sequence import Sequence, SequenceStatus
from backends.core.speculator import Speculator
from backends.core.worker import EngineWorker, Entry, Output, with_first_token_timing
from kvtransfer import KVImporter, KVTransferError


class DecodeWorker(EngineWorker):
    ROLE = "decode"
    REQUEST_TYPES = (DecodeRequest, GenerateRequest)
    WAIT_S = 0.05                   # idle with only copies in flight: wake at least this often

    def __init__(self, engine: LLMEngine, importer: KVImporter, instance_id: str = "",
                 clock=time.monotonic, async_copy: bool = True,
                 step_budget: Callable[[Scheduler], int | None] | None = None,
                 speculator: Speculator | None = None, tpot_slo: float | None = None,
                 plain_steps: Callable[[Scheduler], tuple[float, float]] | None = None) -> None:
        """`async_copy=False` copies inside the step instead (every admission stalls the batch:
        the behaviour before asynchronous admission, kept for comparison). `step_budget`: the
        token budget of each mixed step from the scheduler's state (adaptive mode:
        backends.core.router.step_budget with the TPOT SLO), else the standing budget.
        `speculator`: speculative decoding (the deployment's decode.speculative), else none.
        `tpot_slo` (adaptive mode): its running sequences' TPOT slack goes into `stats()` for
        the router (backends.core.tpot_slack.tpot_slack), counting the sequences' later tokens
        with `plain_steps` (backends.core.tpot_slack.plain_steps of a scheduler) where given."""
        super().__init__(engine, instance_id, clock, speculator=speculator)
        self.step_budget = step_budget
        self.tpot_slo, self.plain_steps = tpot_slo, plain_steps
        self.num_local = 0                              # prompts taken to prefill here
        self.importer = importer
        self.async_copy = async_copy
        self._copier = cf.ThreadPoolExecutor(1, thread_name_prefix=f"{instance_id or 'decode'}-kv")
        self._copies: dict[cf.Future, tuple[Entry, bool]] = {}     # future -> (entry, cancelled)
        self.kv_bytes = 0
        self.kv_seconds = 0.0

    def prefills(self, req: DecodeRequest | GenerateRequest) -> bool:
        return isinstance(req, GenerateRequest)         # a prompt prefilled here, in chunks

    def accepted(self, entry: Entry) -> list[Message]:
        self.num_local += isinstance(entry.req, GenerateRequest)
        return super().accepted(entry)

    def make_sequence(self, req: DecodeRequest | GenerateRequest, now: float) -> Sequence:
        if isinstance(req, GenerateRequest):
            if not self.engine.config.limits.chunked_prefill:
                raise ValueError(f"{self.instance_id or 'this decode instance'} takes no prompts: "
                                 "local prefill needs the deployment's decode.chunked_prefill")
            return self.engine.make_sequence(req.req_id, req.prompt_ids, req.params, None, now)
        return self.engine.make_sequence(req.req_id, req.prompt_ids, req.params,
                                         req.first_token_id, now)

    def on_output(self, entry: Entry, out: StepOutput, now: float) -> Message:
        return with_first_token_timing(super().on_output(entry, out, now), out, now)

    def before_step(self) -> list[Output]:
        out = self._collect()
        for seq in self.engine.admit_remote():
            entry = self.requests[seq.req_id]
            held = seq.num_cached // self.engine.config.limits.block_size   # cached here: not pulled
            future = self._copier.submit(self.importer.fetch, entry.req.kv, list(seq.block_ids[held:]),
                                         held)
            self._copies[future] = (entry, False)
        if not self.async_copy and self._copies:
            cf.wait(list(self._copies))
            out += self._collect()
        return out

    def _collect(self) -> list[Output]:
        """Copies that ended: their sequences join the batch, or fail, or (cancelled) go."""
        out: list[Output] = []
        for future in [f for f in self._copies if f.done()]:
            entry, cancelled = self._copies.pop(future)
            try:
                stats = future.result()
            except (KVTransferError, ValueError) as e:
                self.engine.abort(entry.req_id)
                self._release_quietly(entry.req)          # e.g. refused before reading: lease back
                if not cancelled:
                    out.append(self._emit(entry, Failed(entry.req_id, f"KV hand-off failed: {e}")))
                continue
            if cancelled:
                self.engine.abort(entry.req_id)
                continue
            self.engine.kv_arrived(entry.req_id)
            self.kv_bytes += stats.num_bytes
            self.kv_seconds += stats.seconds
            out.append(self._emit(entry, Admitted(entry.req_id, stats.num_bytes, stats.seconds,
                                                  time.monotonic())))
        return out

    def on_cancel(self, entry: Entry) -> bool:
        for future, (e, _) in self._copies.items():
            if e is entry:
                self._copies[future] = (entry, True)      # freed when the copy ends
                return False
        if entry.seq.status == SequenceStatus.WAITING_FOR_KV:
            self._release_quietly(entry.req)              # never admitted: give the lease back
        return True

    def _release_quietly(self, req: DecodeRequest) -> None:
        try:
            self.importer.release(req.kv)
        except (KVTransferError, ValueError):
            pass            # the lease is gone already; prefill reclaims on expiry anyway

    def token_budget(self) -> int | None:
        return None if self.step_budget is None else self.step_budget(self.engine.scheduler)

    def waits(self) -> bool:
        return bool(self._copies)

    def wait(self) -> None:
        cf.wait(list(self._copies), timeout=self.WAIT_S, return_when=cf.FIRST_COMPLETED)

    def stats(self) -> dict[str, int]:
        s = self.engine.scheduler
        return {**super().stats(), "pending": len(s.remote) + self._inbox.qsize(),
                "loading": len(s.loading), "local_total": self.num_local,
                "expected": len(s.expected), "expected_total": self.num_expected,
                "kv_transfer_bytes": self.kv_bytes,
                "kv_transfer_seconds": self.kv_seconds,
                "tpot_slack_s": 0.0 if self.tpot_slo is None else scheduler_slack(
                    s, self.tpot_slo, self.clock(), self.plain_steps and self.plain_steps(s),
                    self.speculator.tokens_per_step if self.speculator else 1.0)}

    def close(self) -> None:
        self._copier.shutdown(wait=True)
        self.importer.close()
        super().close()
