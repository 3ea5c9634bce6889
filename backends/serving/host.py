"""Everything a prefill, decode or colocated instance does inside a Triton model process,
minus Triton.

    host = build_prefill_host(deployment, index, send, is_cancelled)   # in initialize()
    req = host.parse(raw_request); host.submit(req, ctx)                 # in execute(), per request
    host.close()                                                          # in finalize()

The host owns the worker (which owns the request table), its step loop thread, a sender
thread, the control socket and the status page (backends/core/status_page.py: the instance's
load, published at start and after every turn of the loop, for the orchestrator to read).
`ctx` is whatever the adapter answers a request through; the host calls
`send(ctx, payload, final)` with each encoded message and `is_cancelled(ctx)`.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback

import torch
from collections.abc import Callable
from typing import Any, TypeVar

from backends.core.control import ControlServer, instance_handler, run_dir, socket_path
from backends.core.engine import EngineConfig, LLMEngine
from backends.core.status_page import StatusWriter, status_path
from backends.colocated.worker import ColocatedWorker
from backends.core.messages import decode, encode, is_final
from backends.core.tokenizer import Tokenizer
from backends.core.weight_share import ENV_VAR as SHARED_WEIGHTS_ENV, checkpoint_key
from backends.core.weights import load_checkpoint
from backends.core.kv_cache import dtype_from_name
from backends.core.model_runner import resolve_device
from backends.core.speculator import Speculator, make_speculator
from backends.core.worker import EngineWorker
from backends.core.worker_loop import WorkerLoop
from backends.decode.worker import DecodeWorker
from backends.draft import remote_speculator
from backends.prefill.worker import PrefillWorker
from kvtransfer import make_exporter, make_importer

log = logging.getLogger(__name__)
Send = Callable[[Any, str, bool], None]          # (ctx, payload, final)
T = TypeVar("T")


# Each metric update is an IPC round trip to the server per gauge: publish a few times a
# second, not after every engine step (part of the decode stub's extra CPU per token).
METRICS_PERIOD_S = 0.1
# How often the loop asks Triton whether a client cancelled an outstanding request. Each
# request.is_cancelled() is an IPC round trip to tritonserver under the stub's shared-memory
# mutexes; asked every step for every sequence, it was as many round trips as tokens sent. A stub
# killed while it holds one of those mutexes makes the python backend abort the whole server
# (docs/faults.md), so fewer is safer as well as cheaper. The orchestrator cancels through the
# control socket at once; this poll is for clients of an instance's own model (colocated).
CANCEL_POLL_PERIOD_S = 0.1
STEP_EWMA_ALPHA = 0.2             # weight of the newest step in the status page's step_ewma_s
STACK_DUMP_AFTER_S = 30.0         # a stall this long puts every thread's stack in the log


def thread_stacks() -> str:
    """Every thread's Python stack, innermost call last, named."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items())


def _throttled(fn: Callable[[], T], period_s: float, skipped: T = None) -> Callable[[], T]:
    """fn, called at most once per period_s; a call in between returns `skipped`."""
    last = [float("-inf")]

    def call() -> T:
        now = time.monotonic()
        if now - last[0] < period_s:
            return skipped
        last[0] = now
        return fn()
    return call


class _TimedSteps:
    """The worker as the loop drives it, timing each turn in which the engine ran a batch (the
    whole turn: inbox, KV hand-offs and outputs included, as the running batch feels it)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.last_s = 0.0
        self.ewma_s = 0.0
        self.ran_batch = False             # the last turn ran a batch (progress, for the watchdog)

    def has_work(self) -> bool:
        return self.worker.has_work()

    def cancel(self, req_id: str) -> None:
        self.worker.cancel(req_id)

    def step(self) -> list[Any]:
        engine = self.worker.engine
        before = engine.last_batch
        started = time.perf_counter()
        out = self.worker.step()
        self.ran_batch = engine.last_batch is not None and engine.last_batch is not before
        if self.ran_batch:
            self.last_s = time.perf_counter() - started
            self.ewma_s += (self.last_s - self.ewma_s) * (STEP_EWMA_ALPHA if self.ewma_s else 1.0)
        return out


class InstanceHost:
    def __init__(self, worker: EngineWorker, send: Send, is_cancelled: Callable[[Any], bool],
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.worker = worker
        self.instance_id = worker.instance_id
        self.status = StatusWriter(status_path(run_dir(), self.instance_id), self.instance_id,
                                   worker.ROLE)
        self._steps = _TimedSteps(worker)
        self._status_failed = False
        limits = worker.engine.config.limits
        self._publish_status(block_size=limits.block_size, max_num_seqs=limits.max_num_seqs,
                             max_num_batched_tokens=limits.max_num_batched_tokens,
                             local_prefill=int(limits.chunked_prefill))
        self._send = send
        # Responses go out on their own thread, in order: a send blocks ~0.6 ms on the hand-off
        # to tritonserver, which would otherwise delay the next engine step (B sends per step).
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sending_since = 0.0          # when the send under way began (0: none)
        self._dumped = False               # this stall's stacks are in the log
        self._sender = threading.Thread(target=self._send_loop, name=f"{self.instance_id}-send",
                                        daemon=True)
        self._sender.start()
        self._is_cancelled = is_cancelled
        metrics = _throttled(lambda: on_step(self.stats()), METRICS_PERIOD_S) if on_step else None

        def after() -> None:
            self._publish_status()
            if metrics:
                metrics()
        poll = _throttled(self._poll_cancelled, CANCEL_POLL_PERIOD_S, [])
        self.loop = WorkerLoop(self._steps, self._emit, poll, self._crash, after,
                               name=f"{self.instance_id}-loop")
        self.control = ControlServer(socket_path(run_dir(), self.instance_id),
                                     instance_handler(self._cancel, self.stats, self.loop.wake,
                                                      self.worker.expect if self.worker.ROLE == "decode"
                                                      else None))
        self.loop.start()

    def parse(self, raw: bytes) -> Any:
        """The request message; ValueError (with a clear message) if it is malformed."""
        return decode(raw, *self.worker.REQUEST_TYPES)

    def submit(self, req: Any, ctx: Any) -> None:
        """Queue one parsed request; ValueError if this instance cannot serve it."""
        self.worker.submit(req, ctx)
        self.loop.wake()

    def stats(self) -> dict[str, Any]:
        """The worker's stats, with how long this instance has held work without progress
        (`stalled_s`: its step loop, or a response stuck in its sender; `stalled_in` says
        which). A stall of STACK_DUMP_AFTER_S writes every thread's Python stack to the log,
        once per stall: the orchestrator's probe calls this every second, so a wedged
        instance explains itself."""
        now, sending_since = time.monotonic(), self._sending_since    # read once: the sender resets it
        stalls = {"step loop": self.loop.stalled_s(),
                  "response sender": now - sending_since if sending_since else 0.0}
        where = max(stalls, key=stalls.get)
        stalled = stalls[where]
        if stalled >= STACK_DUMP_AFTER_S and not self._dumped:
            self._dumped = True
            log.error("%s: its %s has made no progress for %.0f s; its threads' stacks:\n%s",
                      self.instance_id, where, stalled, thread_stacks())
        elif stalled < STACK_DUMP_AFTER_S:
            self._dumped = False
        return {"instance_id": self.instance_id, "pid": os.getpid(), **self.worker.stats(),
                "stalled_s": round(stalled, 2), "stalled_in": where if stalled >= 1.0 else ""}

    def _publish_status(self, **static: int) -> None:
        """The worker's stats on the status page (the loop thread; once at start before it).
        Keys that the workers' stats() lack yet (running_context, kv_blocks_promised,
        prefill_rate) are published as 0 until they do."""
        try:
            s = self.worker.stats()
            pending = s.get("pending", 0)      # decode: waiting for KV (queue_depth counts them)
            self.status.publish(
                **static, backlog_tokens=s["backlog_tokens"],
                queued_requests=max(0, s["queue_depth"] - pending), running=s["running"],
                running_context=s.get("running_context", 0), pending=pending,
                loading=s.get("loading", 0),
                free_kv_blocks=max(0, s["kv_blocks_total"] - s["kv_blocks_used"]
                                   - s.get("kv_blocks_promised", 0)),
                total_kv_blocks=s["kv_blocks_total"], last_step_s=self._steps.last_s,
                last_batch_size=s["last_batch_size"], step_ewma_s=self._steps.ewma_s,
                prefill_rate=float(s.get("prefill_rate") or 0.0),
                requests_total=s["requests_total"], rejected_total=s["rejected_total"],
                tokens_per_step=float(s.get("tokens_per_step", 1.0)),
                tpot_slack_s=float(s.get("tpot_slack_s", 0.0)))
        except Exception:                       # noqa: BLE001 - never stop the loop for it
            if not self._status_failed:        # the page goes stale; serving goes on
                self._status_failed = True
                log.exception("publishing %s's status failed", self.instance_id)

    def _emit(self, out: tuple[Any, Any]) -> None:
        ctx, msg = out
        self._outbox.put((ctx, encode(msg), is_final(msg)))

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            self._sending_since = time.monotonic()
            try:
                self._send(*item)
            except Exception:                   # noqa: BLE001 - one bad send must not stop the rest
                log.exception("sending a response failed")
            self._sending_since = 0.0

    def _poll_cancelled(self) -> list[str]:
        """On the loop thread: requests whose client cancelled (Triton's flag)."""
        return [r for r, ctx in self.worker.outstanding() if self._is_cancelled(ctx)]

    def _cancel(self, req_id: str) -> None:
        """From the control socket: stop the request and free its KV (at the next step)."""
        self.worker.cancel(req_id)
        self.loop.wake()

    def _crash(self, e: BaseException) -> None:
        for out in self.worker.fail_all(f"internal error in {self.instance_id}: {e}"):
            self._emit(out)

    def close(self) -> None:
        self.loop.stop()
        self.control.close()
        self.status.close()
        self._outbox.put(None)
        self._sender.join(timeout=10)
        self.worker.close()


def _engine_config(deployment: Any, phase: Any, role: str, index: int) -> EngineConfig:
    device = f"cuda:{phase.gpu(index)}" if phase.device == "gpu" else "cpu"
    return EngineConfig(dtype=deployment.dtype, kv_dtype=deployment.kv_dtype,
                        limits=phase.limits(deployment.block_size),
                        max_model_len=deployment.max_model_len, role=role, device=device,
                        weights=deployment.weights, prefix_caching=phase.prefix_caching,
                        shared_weights_dir=_shared_weights_dir(deployment))


def _shared_weights_dir(deployment: Any) -> str | None:
    """The launcher's private directory for weights shared between instances (deploy/server.py)."""
    return os.environ.get(SHARED_WEIGHTS_ENV) if deployment.share_weights else None


def _transport_options(deployment: Any, ecfg: EngineConfig) -> dict[str, Any]:
    if deployment.kv_transport == "cuda_ipc":
        return {"device": torch.device(ecfg.device).index or 0}
    return {}


def _load(deployment: Any) -> tuple[Any, dict, dict[str, Any]]:
    """(config, state dict, the LLMEngine keywords every instance passes: eos ids, checkpoint id)."""
    path = str(deployment.resolved_model_path())
    config, sd = load_checkpoint(path, dtype_from_name(deployment.dtype),
                                 keep_quantized=deployment.weights != "bf16")
    eos = tuple(sorted(Tokenizer.load(path).stop_token_ids))
    return config, sd, {"eos_token_ids": eos, "checkpoint_id": checkpoint_key(path)}


def build_prefill_host(deployment: Any, index: int, send: Send,
                       is_cancelled: Callable[[Any], bool], on_step=None) -> InstanceHost:
    config, sd, kw = _load(deployment)
    ecfg = _engine_config(deployment, deployment.prefill, "prefill", index)
    resolve_device(ecfg.device)                  # a clear error before any pool is made
    instance_id = f"prefill-{index}"
    exporter = make_exporter(deployment.kv_transport, LLMEngine.kv_layout(config, ecfg), instance_id,
                             lease_timeout_s=deployment.lease_timeout_s,
                             **_transport_options(deployment, ecfg))
    engine = LLMEngine(config, sd, ecfg, kv_pool=exporter.pool, **kw)
    worker = PrefillWorker(engine, exporter, instance_id, admission=deployment.admission())
    return InstanceHost(worker, send, is_cancelled, on_step)


def build_decode_host(deployment: Any, index: int, send: Send,
                      is_cancelled: Callable[[Any], bool], on_step=None) -> InstanceHost:
    config, sd, kw = _load(deployment)
    engine = LLMEngine(config, sd, _engine_config(deployment, deployment.decode, "decode", index),
                       **kw)
    instance_id = f"decode-{index}"
    speculator = _speculator(deployment, deployment.decode, index, config.vocab_size)
    budget, plain = _adaptive_steps(deployment, speculator)
    worker = DecodeWorker(engine, make_importer(deployment.kv_transport, engine.kv), instance_id,
                          step_budget=budget, speculator=speculator,
                          tpot_slo=deployment.slo_tpot_s if deployment.serving_mode == "adaptive"
                          else None, plain_steps=plain)
    return InstanceHost(worker, send, is_cancelled, on_step)


def _speculator(deployment: Any, phase: Any, index: int, vocab_size: int) -> Speculator | None:
    """Instance `index`'s speculative decoding (PhaseSpec.speculative), or None when it is off;
    its drafter in a process of its own on the phase's draft_devices when they are set."""
    if phase.speculative is None:
        return None
    cores = phase.draft_cores(index)
    if phase.draft_model is None:                     # the n-gram: its corpus of finished requests
        options = {"cross_request": phase.draft_corpus}
    else:                                             # a draft model: an engine of its own
        options = dict(model=str(deployment.resolved_model_path(model_path=phase.draft_model)),
                       vocab_size=vocab_size, num_kv_blocks=phase.num_kv_blocks,
                       max_num_seqs=phase.max_num_seqs, max_model_len=deployment.max_model_len)
    if cores is None:
        return make_speculator(phase.speculative, phase.num_speculative_tokens, drafter_options=options)
    return remote_speculator(phase.speculative, phase.num_speculative_tokens, cores, vocab_size,
                             deployment.max_model_len, drafter_options=options)


def _adaptive_steps(deployment: Any, speculator: Speculator | None = None
                    ) -> tuple[Callable[[Any], int | None] | None, Callable[[Any], tuple[float, float]] | None]:
    """Adaptive mode: (the token budget of each mixed step of a decode instance, sized to the
    TPOT SLO and the running sequences' slack by the router's rule, and the plain steps
    (backends.core.tpot_slack.plain_steps) its published slack counts later tokens with), from
    the deployment's latency profile and the speculator's measured yield (tokens per step);
    without a usable profile, neither (mixed steps take the standing
    decode.max_num_batched_tokens, logged)."""
    if deployment.serving_mode != "adaptive":
        return None, None
    from backends.core.router import step_budget
    from backends.core.tpot_slack import plain_steps
    from planner.router_latency import deployment_predictor
    try:
        predictor = deployment_predictor(deployment, deployment.resolved_latency_profile()).decode
    except (OSError, ValueError) as e:
        log.warning("adaptive mode without a latency model (%s): mixed steps take up to "
                    "decode.max_num_batched_tokens tokens", e)
        return None, None
    return (lambda scheduler: step_budget(
        scheduler, predictor, deployment.slo_tpot_s,
        tokens_per_step=speculator.tokens_per_step if speculator else 1.0, now=time.monotonic()),
        lambda scheduler: plain_steps(scheduler, predictor))


def build_colocated_host(deployment: Any, index: int, send: Send,
                         is_cancelled: Callable[[Any], bool], on_step=None) -> InstanceHost:
    if deployment.colocated is None:
        raise ValueError("the deployment has no colocated phase")
    config, sd, kw = _load(deployment)
    engine = LLMEngine(config, sd, _engine_config(deployment, deployment.colocated, "both", index),
                       **kw)
    instance_id = f"colocated-{index}"
    worker = ColocatedWorker(engine, instance_id, admission=deployment.admission(),
                             speculator=_speculator(deployment, deployment.colocated, index,
                                                    config.vocab_size))
    return InstanceHost(worker, send, is_cancelled, on_step)
