"""Triton glue of the `distserve` model (the BLS orchestrator) and of `distserve_colocated` (the
colocated baseline's front end, MODE "colocated"), with Triton's module injected.

Each request runs as its own coroutine: prefill is one BLS call, decode a decoupled BLS stream
whose blocking iterator is read on a thread pool (its `next` releases the GIL) so one slow
stream never stalls the others; the colocated mode has only the stream, from `colocated`.
Every failure becomes an error response followed by FINAL.
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, ClassVar

import numpy as np

from backends.core.control import run_dir, send, socket_path
from backends.orchestrator.pipeline import Chunk, Generation, Orchestrator
from backends.serving.adapter import bytes_tensor
from backends.serving.metrics import RequestMetrics

log = logging.getLogger(__name__)

_BYTES_LISTS = {"stop"}
_INT_LISTS = {"input_ids"}
_SCALARS = {"text_input", "messages", "max_tokens", "stream", "temperature", "top_p", "top_k",
            "seed", "ignore_eos", "return_token_ids", "return_timing"}


def read_inputs(pb: Any, request: Any) -> dict[str, Any]:
    """The request's tensors as plain Python values (absent inputs are left out)."""
    out: dict[str, Any] = {}
    for name in _SCALARS | _BYTES_LISTS | _INT_LISTS:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        arr = tensor.as_numpy().reshape(-1)
        if name in _INT_LISTS:
            out[name] = [int(x) for x in arr]
        elif name in _BYTES_LISTS:
            out[name] = [_text(name, x) for x in arr]
        elif arr.size != 1:
            raise ValueError(f"input {name!r} must hold one element, got {arr.size}")
        elif arr.dtype == np.object_:
            out[name] = _text(name, arr[0])
        else:
            out[name] = arr[0].item()
    return out


def _drain(responses: Any) -> None:
    for _ in responses:
        pass


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
        from deploy.runtime import deployment_from_config
        deployment = deployment_from_config(args["model_config"])
        tokenizer = Tokenizer.load(str(deployment.resolved_model_path()))
        self.orch = Orchestrator(tokenizer, deployment.max_model_len, deployment.default_max_tokens)
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="bls-stream")
        self.control_dir = run_dir()
        if self.MODE not in ("disaggregated", "colocated"):
            raise ValueError(f"MODE must be disaggregated or colocated, got {self.MODE!r}")
        self.metrics = RequestMetrics(self.pb, args["model_name"])

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(r) for r in requests))

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
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
            if not isinstance(e, ValueError):
                log.exception("request failed")
            try:
                sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(str(e))), flags=final)
            except Exception:                        # noqa: BLE001 - the client is gone
                pass

    def _run(self, gen: Generation, is_cancelled) -> AsyncIterator[Chunk]:
        if self.MODE == "colocated":
            return self.orch.run_colocated(gen, self._stream_from("colocated"), self._cancel,
                                           is_cancelled)
        return self.orch.run(gen, self._prefill, self._stream_from("decode"), self._cancel,
                             is_cancelled)

    def _response(self, chunk: Chunk, gen: Generation) -> Any:
        pb = self.pb
        tensors = [bytes_tensor(pb, "text_output", chunk.text)]
        if gen.return_token_ids:
            tensors.append(pb.Tensor("token_ids", np.array(chunk.token_ids, dtype=np.int32)))
        if chunk.finish_reason is not None:
            tensors.append(bytes_tensor(pb, "finish_reason", chunk.finish_reason))
        if chunk.timing is not None and gen.return_timing:
            tensors.append(bytes_tensor(pb, "timing", json.dumps(chunk.timing.to_dict())))
        return pb.InferenceResponse(tensors)

    def _bls(self, model: str, payload: str) -> Any:
        return self.pb.InferenceRequest(model_name=model, requested_output_names=["response"],
                                        inputs=[bytes_tensor(self.pb, "request", payload)])

    def _payload(self, response: Any) -> str | None:
        if response.has_error():
            raise RuntimeError(response.error().message())
        tensor = self.pb.get_output_tensor_by_name(response, "response")
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0].decode()

    async def _prefill(self, payload: str) -> str:
        response = await self._bls("prefill", payload).async_exec()
        out = self._payload(response)
        if out is None:
            raise RuntimeError("prefill returned no response")
        return out

    def _stream_from(self, model: str):
        """A decoupled BLS stream from `model` (decode or colocated): payload -> responses.

        Closed early (cancel, stop string), it reads the rest in the background: the instance
        ends the stream at once after a cancel, and an unread BLS stream would keep this model
        from unloading."""
        async def stream(payload: str) -> AsyncIterator[str]:
            responses = await self._bls(model, payload).async_exec(decoupled=True)
            loop = asyncio.get_running_loop()
            done = False
            try:
                while not done:
                    response = await loop.run_in_executor(self.pool, next, responses, None)
                    done = response is None
                    out = None if done else self._payload(response)
                    if out is not None:
                        yield out
            finally:
                if not done:
                    self.pool.submit(_drain, responses)
        return stream

    def _cancel(self, instance_id: str, req_id: str) -> None:
        if not instance_id:
            return
        try:
            send(socket_path(self.control_dir, instance_id), {"op": "cancel", "req_id": req_id})
        except OSError as e:
            log.warning("could not cancel %s on %s: %s", req_id, instance_id, e)

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
