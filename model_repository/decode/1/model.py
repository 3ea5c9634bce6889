"""Triton adapter of the decode instances; the logic lives in backends/serving."""
import triton_python_backend_utils as pb_utils

from backends.serving.adapter import EngineModel


class TritonPythonModel(EngineModel):
    PHASE = "decode"
    pb = pb_utils
