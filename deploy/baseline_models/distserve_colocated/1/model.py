"""Triton adapter of the colocated baseline's front end; the logic lives in backends/."""
import triton_python_backend_utils as pb_utils

from backends.serving.orchestrator_adapter import OrchestratorModel


class TritonPythonModel(OrchestratorModel):
    MODE = "colocated"
    pb = pb_utils
