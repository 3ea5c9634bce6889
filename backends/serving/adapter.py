"""Triton glue shared by the prefill, decode and colocated models, with Triton's module injected.

`model_repository/{prefill,decode,colocated}/1/model.py` subclass `EngineModel` and set `pb` to
`triton_python_backend_utils`; this file never imports it, so core stays Triton-free and the
glue runs in tests with fake Triton types.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

import numpy as np

from backends.core.messages import DecodeOutput
from backends.serving.host import build_colocated_host, build_decode_host, build_prefill_host
from backends.serving.metrics import EngineMetrics

log = logging.getLogger(__name__)
_BUILDERS = {"prefill": build_prefill_host, "decode": build_decode_host,
             "colocated": build_colocated_host}


def bytes_input(pb: Any, request: Any, name: str) -> bytes:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing input {name!r}")
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise ValueError(f"input {name!r} must hold one element, got {value.size}")
    v = value[0]
    return v if isinstance(v, bytes) else str(v).encode()


def bytes_tensor(pb: Any, name: str, text: str) -> Any:
    return pb.Tensor(name, np.array([text.encode()], dtype=np.object_))


class EngineModel:
    """A prefill, decode or colocated instance: requests go to the host's engine thread, which
    answers through each request's response sender."""
    PHASE: ClassVar[str] = ""
    pb: ClassVar[Any] = None

    def initialize(self, args: dict[str, Any]) -> None:
        from deploy.runtime import init_instance
        deployment, _, index = init_instance(args, self.PHASE)
        self._senders: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        metrics = EngineMetrics(self.pb, self.PHASE, f"{self.PHASE}-{index}")
        self.host = _BUILDERS[self.PHASE](deployment, index, self._send, self._is_cancelled,
                                          metrics.update)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self.host.parse(bytes_input(self.pb, request, "request"))
                with self._lock:
                    if req.req_id in self._senders:
                        raise ValueError(f"request id {req.req_id!r} is already in flight")
                    self._senders[req.req_id] = (request, sender)
                try:
                    self.host.submit(req)
                except ValueError:
                    with self._lock:
                        self._senders.pop(req.req_id, None)
                    raise
            except ValueError as e:
                self._respond(sender, *self._error_payload("", str(e)), final=True)
        return None

    def _error_payload(self, req_id: str, error: str) -> tuple[str | None, str | None]:
        """(payload, error) for a failure. A decoupled phase (decode, colocated) reports it as
        an ordinary final response whose payload carries the error: a Triton error response
        on a decoupled BLS stream never reaches the orchestrator's response iterator (python
        backend 2.51), which would then wait forever."""
        if self.PHASE == "prefill":
            return None, error
        return DecodeOutput(req_id, finished=True, finish_reason="error", error=error).to_json(), None

    def _is_cancelled(self, req_id: str) -> bool:
        with self._lock:
            entry = self._senders.get(req_id)
        return entry is not None and entry[0].is_cancelled()

    def _send(self, req_id: str, payload: str | None, error: str | None, final: bool) -> None:
        with self._lock:
            entry = self._senders.pop(req_id, None) if final else self._senders.get(req_id)
        if entry is not None:
            if error is not None:
                payload, error = self._error_payload(req_id, error)
            self._respond(entry[1], payload, error, final)

    def _respond(self, sender: Any, payload: str | None, error: str | None, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if error is not None:
            response = self.pb.InferenceResponse(error=self.pb.TritonError(error))
        else:
            response = self.pb.InferenceResponse([bytes_tensor(self.pb, "response", payload)])
        try:
            sender.send(response, flags=flags)
        except Exception:                       # noqa: BLE001 - client gone; nothing to tell
            log.warning("could not send a response (client gone?)", exc_info=True)

    def finalize(self) -> None:
        self.host.close()
