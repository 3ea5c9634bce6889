"""Triton adapter of the `distserve` BLS orchestrator; the logic lives in backends/."""
import triton_python_backend_utils as pb_utils

from backends.serving.orchestrator_adapter import OrchestratorModel


class TritonPythonModel(OrchestratorModel):
    pb = pb_utils
