"""Triton glue shared by the engine models, with Triton's module injected.

`model_repository/engine_model.py` (the adapter of every prefill and decode instance's model,
`prefill_0`, `decode_1`, ...: each one's 1/model.py links to it) and the colocated baseline's
`colocated/1/model.py` subclass `EngineModel` and set `pb` to `triton_python_backend_utils`;
this file never imports it, so core stays Triton-free and the glue runs in tests with fake
Triton types.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from backends.core.messages import Failed, encode
from backends.serving.host import build_colocated_host, build_decode_host, build_prefill_host
from backends.serving.metrics import EngineMetrics, release_at_finalize

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
    answers through each request's response sender. Every answer, an error included, is a
    message in the `response` tensor (backends/core/messages.py): a Triton error response on a
    decoupled BLS stream never reaches the orchestrator's response iterator (python backend
    2.51), which would then wait forever."""
    PHASE: ClassVar[str] = ""       # "": the phase of the model's name (`decode_1`)
    pb: ClassVar[Any] = None

    def initialize(self, args: dict[str, Any]) -> None:
        from deploy.contract import instance_id, model_instance
        from deploy.runtime import enable_crash_traces, init_instance
        enable_crash_traces()
        phase = self.PHASE or model_instance(args["model_name"])[0]
        deployment, _, index = init_instance(args, phase)
        self.metrics = EngineMetrics(self.pb, phase, instance_id(phase, index))
        self.host = _BUILDERS[phase](deployment, index, self._send, self._is_cancelled,
                                     self.metrics.update)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.host.submit(self.host.parse(bytes_input(self.pb, request, "request")),
                                 (request, sender))
            except ValueError as e:
                self._send((request, sender), encode(Failed("-", str(e), getattr(e, "code", ""))), True)
        return None

    @staticmethod
    def _is_cancelled(ctx: tuple[Any, Any]) -> bool:
        return ctx[0].is_cancelled()

    def _send(self, ctx: tuple[Any, Any], payload: str, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            ctx[1].send(self.pb.InferenceResponse([bytes_tensor(self.pb, "response", payload)]),
                        flags=flags)
        except Exception:                       # noqa: BLE001 - client gone; nothing to tell
            log.warning("could not send a response (client gone?)", exc_info=True)

    def finalize(self) -> None:
        self.host.close()
        release_at_finalize(self, self.metrics)
