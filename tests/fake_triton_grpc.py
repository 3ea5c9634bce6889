"""A stand-in for Triton's gRPC endpoint, for client tests: the real protocol (tritonclient's
GRPCInferenceService protobufs on a grpcio server in threads) with a scripted model behind it.

`serve(script)` runs one on a free port. `script(request)` gives, for each ModelInferRequest,
the steps of its stream: a ModelStreamInferResponse to send (`response(...)`), or a number of
seconds to wait; then the server ends the RPC. An RPC that ends before its request did (before
its final or error response, or the end of the script), so the client cancelled it, is
recorded in `FakeTriton.cancelled` (request ids): there, Triton would cancel the request.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from deploy.contract import DISTSERVE, FINISH_REASON, TEXT_OUTPUT, TIMING, TOKEN_IDS

Script = Callable[[Any], list]


def response(text: str | None = None, ids: int | list[int] | None = None, finish: str | None = None,
             timing: dict | None = None, final: bool = False, error: str | None = None) -> Any:
    """One stream response: the given outputs (none: an empty response), flagged final or not."""
    out = service_pb2.ModelStreamInferResponse(error_message=error or "")
    infer = out.infer_response
    infer.model_name = DISTSERVE
    for name, value in ((TEXT_OUTPUT, text), (TOKEN_IDS, ids), (FINISH_REASON, finish),
                        (TIMING, None if timing is None else json.dumps(timing))):
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        is_bytes = name != TOKEN_IDS
        infer.outputs.add(name=name, datatype="BYTES" if is_bytes else "INT32", shape=[len(items)])
        infer.raw_output_contents.append(
            serialize_byte_tensor(np.array([x.encode() for x in items], dtype=np.object_)).item()
            if is_bytes else np.array(items, dtype=np.int32).tobytes())
    infer.parameters["triton_final_response"].bool_param = final
    return out


def inputs(request: Any) -> dict[str, np.ndarray]:
    """A ModelInferRequest's inputs as numpy arrays (BYTES as bytes objects)."""
    arrays = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = deserialize_bytes_tensor(raw)
        else:
            arrays[tensor.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
    return arrays


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Any] = []
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def ModelStreamInfer(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        request = next(request_iterator)
        with self._lock:
            self.requests.append(request)
        ended, served = threading.Event(), threading.Event()
        context.add_callback(lambda: self._ended(request.id, served, ended))
        for step in self.script(request):
            if isinstance(step, (int, float)):
                if ended.wait(step):
                    return
                continue
            final = step.infer_response.parameters.get("triton_final_response")
            if step.error_message or (final is not None and final.bool_param):
                served.set()                         # the request is over once this is out
            yield step
        served.set()

    def _ended(self, request_id: str, served: threading.Event, ended: threading.Event) -> None:
        """The RPC is over: cancelled by the client, unless its request was over already."""
        if not served.is_set():
            with self._lock:
                self.cancelled.append(request_id)
        ended.set()


@contextmanager
def serve(script: Script) -> Iterator[tuple[str, FakeTriton]]:
    """("127.0.0.1:port", the servicer) of a fake Triton running `script`."""
    pool = ThreadPoolExecutor(max_workers=16)
    server = grpc.server(pool)
    servicer = FakeTriton(script)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)
        pool.shutdown(wait=False)
