"""Colocated instance: one engine runs both phases of its requests, with continuous batching
(the baseline DistServe is measured against). New prompts pre-empt the decode batch for a step,
as in vLLM; with chunked prefill they ride along with it in chunks under the step's token
budget, as in Sarathi-Serve (see backends/core/scheduler.py).

Lifecycle (backends/core/worker.py): accepted (a message carrying the instance id, so the
caller can cancel) -> the engine's waiting queue (FCFS) -> prefilled, in one step or in chunks
over several -> the first token, with its queueing and prefill times -> one token per step
(with a `speculator`, 1..k+1 per verified draft) -> finished or cancelled: its blocks are freed
either way.
"""
from __future__ import annotations

from backends.core.engine import StepOutput
from backends.core.messages import GenerateRequest, Message
from backends.core.worker import EngineWorker, Entry, with_first_token_timing


class ColocatedWorker(EngineWorker):
    ROLE = "both"
    REQUEST_TYPES = (GenerateRequest,)

    def on_output(self, entry: Entry, out: StepOutput, now: float) -> Message:
        return with_first_token_timing(super().on_output(entry, out, now), out, now)
