"""Triton adapter of the colocated baseline's instances; the logic lives in backends/serving."""
import triton_python_backend_utils as pb_utils

from backends.serving.adapter import EngineModel


class TritonPythonModel(EngineModel):
    PHASE = "colocated"
    pb = pb_utils
