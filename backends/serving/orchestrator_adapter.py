"""Triton glue of the `distserve` model (the BLS orchestrator) and of `distserve_colocated` (the
colocated baseline's front end, MODE "colocated"), with Triton's module injected.

Each request runs as its own coroutine: prefill is one BLS call, decode a decoupled BLS stream
whose blocking iterator is read on a thread pool (its `next` releases the GIL) so one slow
stream never stalls the others; the colocated mode has only the stream, from `colocated`.
The BLS calls run on this model's own pool too, not with `async_exec`: that one uses the
event loop's default executor (cores + 4 threads), and a call to a stub that died never
returns, so a few deaths would leave no thread for any later request.
Every failure becomes an error response followed by FINAL. An `InstanceMonitor`
(backends/orchestrator/health.py) probes the engine instances' control sockets: a request
waiting on an instance that died or stopped answering fails within seconds, and a dead
instance's model is reloaded through Triton's model-control API (the launcher runs
tritonserver with explicit model control and tells the stubs its HTTP address).
Each prefill and decode instance is a Triton model of its own (`prefill_0`, `decode_1`), so
the monitor places every prefill and every decode request on a live instance of its phase
(`InstanceMonitor.place`, least loaded) and the request watches that instance from the start;
a reload restarts that instance alone. The colocated baseline's instances share one model
(`colocated`): Triton picks, and a request watches its phase until the instance says which.
`distserve_batched` (max_batch_size 1) runs this same adapter: `read_inputs` takes any shape
holding the values, and its outputs get the leading batch dimension of 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, ClassVar

import numpy as np

from backends.core.control import run_dir, send, socket_path
from backends.orchestrator.dispatch import adaptive_dispatcher, observed
from backends.orchestrator.health import InstanceMonitor, Watch, phase_of
from backends.core.admission import OVERLOADED
from backends.core.messages import Accepted, Admitted, Failed, Prefilled, Tokens, decode
from backends.core.tpot_slack import sure_after_prefill
from backends.orchestrator.pipeline import Chunk, Generation, Orchestrator, RequestFailed
from backends.serving.adapter import bytes_tensor
from backends.serving.bls_keep import Keeper
from backends.serving.metrics import HealthMetrics, RequestMetrics, release_at_finalize
from deploy.contract import DISTSERVE_SPEC, instance_id, instance_model
from deploy.supervisor import reload_model

log = logging.getLogger(__name__)


def read_inputs(pb: Any, request: Any) -> dict[str, Any]:
    """The request's tensors as plain Python values (absent inputs are left out): a list for an
    input of dims [-1], else the one element (any shape holding one: [1] or a batched [1, 1])."""
    out: dict[str, Any] = {}
    for spec in DISTSERVE_SPEC.inputs:
        name = spec.name
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        arr = tensor.as_numpy().reshape(-1)
        if spec.dims == (-1,) and spec.dtype != "BYTES":
            out[name] = [int(x) for x in arr]
        elif spec.dims == (-1,):
            out[name] = [_text(name, x) for x in arr]
        elif arr.size != 1:
            raise ValueError(f"input {name!r} must hold one element, got {arr.size}")
        elif arr.dtype == np.object_:
            out[name] = _text(name, arr[0])
        else:
            out[name] = arr[0].item()
    return out


def _text(name: str, value: Any) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} is not valid UTF-8") from None


class OrchestratorModel:
    pb: ClassVar[Any] = None
    MODE: ClassVar[str] = "disaggregated"       # or "colocated"

    def initialize(self, args: dict[str, Any]) -> None:
        from backends.core.tokenizer import Tokenizer
        from deploy.runtime import deployment_from_config, enable_crash_traces
        enable_crash_traces()
        deployment = deployment_from_config(args["model_config"])
        # distserve_batched (max_batch_size 1): outputs get the leading batch dimension too
        config = args["model_config"]
        self.batched = (json.loads(config) if isinstance(config, str) else config).get("max_batch_size", 0) > 0
        tokenizer = Tokenizer.load(str(deployment.resolved_model_path()))
        self.orch = Orchestrator(tokenizer, deployment.max_model_len, deployment.default_max_tokens)
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="bls-stream")
        self.keep = Keeper()                     # finished BLS streams, freed with the GIL (bls_keep)
        self.control_dir = run_dir()
        if self.MODE not in ("disaggregated", "colocated"):
            raise ValueError(f"MODE must be disaggregated or colocated, got {self.MODE!r}")
        self.metrics = RequestMetrics(self.pb, args["model_name"])
        phases = (("colocated", deployment.colocated),) if self.MODE == "colocated" else \
            (("prefill", deployment.prefill), ("decode", deployment.decode))
        ids = [instance_id(name, i) for name, phase in phases if phase is not None
               for i in range(phase.num_instances)]
        self.health = HealthMetrics(self.pb, ids, phase_of, args["model_name"])
        self.monitor = InstanceMonitor(ids, self._probe, self._reload, on_round=self.health.update)
        self.monitor.start()
        self.dispatcher = None                   # adaptive mode: where each request runs
        if self.MODE == "disaggregated" and deployment.serving_mode == "adaptive":
            self.dispatcher = adaptive_dispatcher(
                deployment, self.control_dir, lambda i: self.monitor.status().get(i) in ("up", "starting"))

    def _probe(self, instance_id: str) -> dict[str, Any]:
        return send(socket_path(self.control_dir, instance_id), {"op": "stats"}, timeout=1.0)

    def _reload(self, model: str) -> None:
        """Ask Triton to load `model` again (a dead stub is restarted; for prefill and decode,
        the one instance the model holds). One orchestrator instance does it: the others find
        the lock taken."""
        url = os.environ.get(SERVER_URL_ENV)
        if not url:
            log.error("cannot reload %s: %s is not set (start the server with deploy.server)",
                      model, SERVER_URL_ENV)
            return
        with open(self.control_dir / f"reload-{model}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                              # another orchestrator instance is on it
            reload_model(url, model)

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(r) for r in requests))

    async def _serve(self, request: Any) -> None:
        """Answer one request; if its client goes away (Triton's cancelled flag, polled every
        CANCEL_POLL_S even while nothing arrives: the request may wait for prefill or for
        decode's admission), stop it and free what it holds on the instances."""
        sender = request.get_response_sender()
        self.metrics.in_flight(+1)
        try:
            task = asyncio.ensure_future(self._respond(request, sender))
            while not task.done():
                await asyncio.wait({task}, timeout=CANCEL_POLL_S)
                if not task.done() and request.is_cancelled():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    with contextlib.suppress(Exception):
                        sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.metrics.in_flight(-1)

    async def _respond(self, request: Any, sender: Any) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            gen = self.orch.parse(read_inputs(self.pb, request))
            async for chunk in self._run(gen, request.is_cancelled):
                done = chunk.finish_reason is not None
                sender.send(self._response(chunk, gen), flags=final if done else 0)
                if done:
                    self.metrics.observe(chunk.timing)
                    return
            sender.send(flags=final)                 # cancelled: no more responses
        except Exception as e:                       # noqa: BLE001 - becomes the client's error
            if not isinstance(e, (ValueError, RequestFailed)):
                log.exception("request failed")
            try:
                sender.send(self.pb.InferenceResponse(error=self._error(e)), flags=final)
            except Exception:                        # noqa: BLE001 - the client is gone
                pass

    def _error(self, e: Exception) -> Any:
        """Triton's error for `e`: bad input is INVALID_ARG, an overloaded instance UNAVAILABLE
        (the client may retry), anything else INTERNAL."""
        error = self.pb.TritonError
        if isinstance(e, ValueError):
            code = "INVALID_ARG"
        elif getattr(e, "code", "") == OVERLOADED:
            code = "UNAVAILABLE"
        else:
            code = "INTERNAL"
        return error(str(e), getattr(error, code))

    def _run(self, gen: Generation, is_cancelled) -> AsyncIterator[Chunk]:
        if self.MODE == "colocated":
            return self.orch.run_colocated(gen, self._stream_from("colocated"), self._cancel,
                                           is_cancelled)
        down = self._phase_down("decode")
        if down:                                 # refused now, not after a wasted prefill
            raise RuntimeError(f"no decode instance can serve: {down}")
        if self.dispatcher is not None:          # adaptive: the router decides
            placement = self.dispatcher.place(len(gen.prompt_ids), gen.params.max_tokens,
                                              self.dispatcher.slos(gen.slo_ttft_s, gen.slo_tpot_s),
                                              gen.prompt_ids)
            gen = dataclasses.replace(gen, route=placement.decision)
            if placement.kind == "local":        # prefilled in chunks in its decode steps
                chunks = self.orch.run_colocated(gen, self._stream_from("decode", placement.decode),
                                                 self._cancel, is_cancelled)
            else:
                chunks = self._expected(functools.partial(
                    self.orch.run, gen, functools.partial(self._prefill, instance=placement.prefill),
                    self._stream_from("decode", placement.decode), self._cancel, is_cancelled),
                    placement.decode, gen)
            return observed(chunks, self.dispatcher, placement)   # how late its prediction ran
        return self.orch.run(gen, self._prefill, self._stream_from("decode"), self._cancel,
                             is_cancelled)

    async def _expected(self, run: Any, instance: str, gen: Generation) -> AsyncIterator[Chunk]:
        """`run()`'s chunks, a split request's, once its decode instance has been told to expect
        it (before its prefill starts, so the word cannot come after the request itself): the
        instance holds its mixed steps to what this request can wait. If they end before the
        last chunk (its prefill failed, say, or the stream was closed), that instance is told to
        forget it; not after it (`_respond` stops at the last chunk, and this generator is closed
        later)."""
        await asyncio.get_running_loop().run_in_executor(
            self.pool, self._send_expect, instance, gen.req_id, sure_after_prefill(gen.params))
        finished = False
        try:
            async for chunk in run():
                finished = chunk.finish_reason is not None
                yield chunk
        except BaseException:
            if not finished:
                self._cancel(instance, gen.req_id)
            raise

    def _send_expect(self, instance_id: str, req_id: str, sure: int) -> None:
        try:
            send(socket_path(self.control_dir, instance_id),
                 {"op": "expect", "req_id": req_id, "sure_tokens": sure}, timeout=EXPECT_TIMEOUT_S)
        except OSError as e:                # it only shapes that instance's steps: go on
            log.warning("could not tell %s to expect %s: %s", instance_id, req_id, e)

    def _phase_down(self, phase: str) -> str:
        """Why no instance of `phase` can serve ("" while one can)."""
        status = {i: s for i, s in self.monitor.status().items() if phase_of(i) == phase}
        if not status or any(s in ("up", "starting") for s in status.values()):
            return ""
        return ", ".join(f"{i} is {s}" for i, s in status.items())

    def _response(self, chunk: Chunk, gen: Generation) -> Any:
        text = lambda s: np.array([s.encode()], dtype=np.object_)  # noqa: E731
        arrays = {"text_output": text(chunk.text)}
        if gen.return_token_ids:
            arrays["token_ids"] = np.array(chunk.token_ids, dtype=np.int32)
        if chunk.finish_reason is not None:
            arrays["finish_reason"] = text(chunk.finish_reason)
        if chunk.timing is not None and gen.return_timing:
            arrays["timing"] = text(json.dumps(chunk.timing.to_dict()))
        return self.pb.InferenceResponse([self.pb.Tensor(name, a.reshape(1, -1) if self.batched else a)
                                          for name, a in arrays.items()])

    def _bls(self, model: str, payload: str) -> Any:
        return self.pb.InferenceRequest(model_name=model, requested_output_names=["response"],
                                        inputs=[bytes_tensor(self.pb, "request", payload)])

    def _payload(self, response: Any) -> str | None:
        if response.has_error():
            raise RuntimeError(response.error().message())
        tensor = self.pb.get_output_tensor_by_name(response, "response")
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0].decode()

    async def _prefill(self, payload: str, instance: str | None = None) -> str:
        """Prefill on `instance`, or on the prefill instance the monitor places it on."""
        watch = self.monitor.watch_instance(instance) if instance is not None else \
            self.monitor.place("prefill", len(json.loads(payload)["prompt_ids"]))
        try:
            response = await self._call(watch, lambda: self._bls(instance_model(watch.instance),
                                                                 payload).exec(),
                                        on_cancel=self._drop_prefilled)
        finally:
            watch.close()
        out = self._payload(response)
        if out is None:
            raise RuntimeError("prefill returned no response")
        return out

    async def _call(self, watch: Watch, call: Any, on_cancel: Any = None) -> Any:
        """A blocking BLS call on the pool, unless the instance it goes to (or every instance
        of its phase) is down. If the request is cancelled meanwhile, `on_cancel(result)` runs
        when the call returns."""
        await asyncio.sleep(0)                  # a watch that failed at creation has resolved
        if watch.failed.done():
            raise RuntimeError(f"request failed: {watch.failed.result()}")
        fut = asyncio.get_running_loop().run_in_executor(self.pool, call)
        try:
            return await _first_or_failure(fut, watch)
        except asyncio.CancelledError:
            if on_cancel is not None:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception() or on_cancel(f.result()))
            raise

    def _drop_prefilled(self, response: Any) -> None:
        """A prefill answer nobody will read (its client went away): free its KV lease now
        rather than at the lease's expiry."""
        try:
            res = decode(self._payload(response) or "", Prefilled, Failed)
        except (ValueError, RuntimeError):
            return
        if isinstance(res, Prefilled) and res.kv is not None:
            self._cancel(res.instance_id, res.req_id)

    def _kv_source_watch(self, request: dict[str, Any]) -> Watch | None:
        """For a decode request: a watch on the prefill instance that holds its KV, until decode
        has taken the KV in (KV a dead prefill instance exported is never read)."""
        if request.get("type") != "decode":
            return None
        return self.monitor.watch_instance(request["kv"]["instance_id"])

    def _stream_from(self, phase: str, instance: str | None = None):
        """A decoupled BLS stream from an instance of `phase` (decode: `instance`, or the one
        the monitor places it on; colocated: the one Triton picks): payload -> responses.

        Closed early (cancel, stop string), it reads the rest in the background: the instance
        ends the stream at once after a cancel, and an unread BLS stream would keep its model
        from unloading."""
        async def stream(payload: str) -> AsyncIterator[str]:
            request = json.loads(payload)               # our own message: well formed
            if instance is not None:
                watch = self.monitor.watch_instance(instance)
            else:
                watch = self.monitor.place(phase) if phase == "decode" else self.monitor.watch(phase)
            model = instance_model(watch.instance) if watch.instance else phase
            kv_watch = self._kv_source_watch(request)
            watches = (watch,) if kv_watch is None else (watch, kv_watch)
            responses, read, done, cancelled, accepted = None, None, False, False, False
            try:
                loop = asyncio.get_running_loop()
                responses = await self._call(watch, lambda: self._bls(model, payload).exec(decoupled=True),
                                             on_cancel=lambda r: self.pool.submit(
                                                 self._drain, r, request["req_id"]))
                while not done:
                    read = loop.run_in_executor(self.pool, next, responses, None)
                    response = await _first_or_failure(read, *watches)
                    done = response is None
                    out = None if done else self._payload(response)
                    if out is not None:
                        if not accepted and out.startswith('{"type":"accepted"'):
                            accepted = True
                            if watch.instance is None:
                                watch.narrow(json.loads(out)["instance_id"])
                        elif len(watches) > 1 and out.startswith('{"type":"admitted"'):
                            watches = (watch,)          # the KV is in: its source may go
                        yield out
            except asyncio.CancelledError:
                cancelled = True                        # the client went away
                raise
            finally:
                failed = any(w.failed.done() and not w.failed.cancelled() for w in watches)
                if (failed or cancelled) and accepted:
                    # a stopped instance reads this when it resumes and frees the request; a
                    # request whose KV source died is dropped before its KV is read
                    self._cancel(watch.instance, request["req_id"])
                for w in (watch, kv_watch):
                    if w is not None:
                        w.close()
                if done:
                    self.keep.hold(responses)
                # an unfinished stream is read to its end in the background (after the read in
                # flight, if the instance went down mid-read); failed or cancelled before the
                # instance accepted it, the request is cancelled once it does (a cancel that
                # overtook the request would be lost)
                if not done and responses is not None:
                    req_id = request["req_id"] if (cancelled or failed) and not accepted else None
                    if read is None or read.done():
                        self.pool.submit(self._drain, responses, req_id)
                    else:
                        read.add_done_callback(lambda f: self.pool.submit(
                            self._drain, responses, req_id, f.result() if not f.exception() else None))
        return stream

    def _drain(self, responses: Any, cancel_req_id: str | None = None, first: Any = None) -> None:
        """Read a BLS stream to its end (`first`: a response already read from it); with
        `cancel_req_id`, cancel that request on the instance that accepts it."""
        for response in itertools.chain([first] if first is not None else [], responses):
            if cancel_req_id is None:
                continue
            try:
                msg = decode(self._payload(response) or "", Accepted, Admitted, Tokens, Failed)
            except (ValueError, RuntimeError):
                continue
            if isinstance(msg, Accepted):
                self._send_cancel(msg.instance_id, cancel_req_id)
                cancel_req_id = None
        self.keep.hold(responses)

    def _cancel(self, instance_id: str, req_id: str) -> None:
        """Cancel `req_id` on an instance, from the pool: the send may wait on a stopped
        instance (up to its timeout), and the event loop must not."""
        if instance_id:
            self.pool.submit(self._send_cancel, instance_id, req_id)

    def _send_cancel(self, instance_id: str, req_id: str) -> None:
        try:
            send(socket_path(self.control_dir, instance_id), {"op": "cancel", "req_id": req_id})
        except OSError as e:
            log.warning("could not cancel %s on %s: %s", req_id, instance_id, e)

    def finalize(self) -> None:
        self.monitor.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        release_at_finalize(self, self.health, self.metrics)


SERVER_URL_ENV = "DISTSERVE_SERVER_URL"
EXPECT_TIMEOUT_S = 0.5         # telling a decode instance to expect a request: at most this long
CANCEL_POLL_S = 0.25            # how often a request waiting on an instance checks its client


async def _first_or_failure(fut: asyncio.Future, *watches: Watch) -> Any:
    """`fut`'s result, or RuntimeError as soon as an instance the request waits on goes down
    (`fut` is left running: a blocked BLS read cannot be interrupted)."""
    failed = {w.failed for w in watches}
    done, _ = await asyncio.wait({fut, *failed}, return_when=asyncio.FIRST_COMPLETED)
    if fut in done:
        return fut.result()
    raise RuntimeError(f"request failed: {next(f for f in failed if f.done()).result()}")
