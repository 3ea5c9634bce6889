"""Client SDK and CLI of DistServe on Triton (see client/sdk.py; `python -m client --help`)."""
from __future__ import annotations

from .results import Chunk, Completion, DistServeError
from .sdk import DistServeClient, Stream

__all__ = ["Chunk", "Completion", "DistServeClient", "DistServeError", "Stream"]
