"""Triton adapter of every prefill and decode instance's model (`prefill_0`, `decode_1`, ...:
each one's 1/model.py is a link to this file); the phase and instance index come from the
model's name, the logic lives in backends/serving."""
import triton_python_backend_utils as pb_utils

from backends.serving.adapter import EngineModel


class TritonPythonModel(EngineModel):
    pb = pb_utils
