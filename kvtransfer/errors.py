"""Errors raised by KV transports. Every failure a caller may want to handle has its own type."""
from __future__ import annotations


class InvalidDescriptor(ValueError):
    """A KV descriptor (or its JSON) is malformed, forged, or out of bounds."""


class KVTransferError(RuntimeError):
    """A transfer could not be done; the destination blocks hold no usable data."""


class SegmentError(KVTransferError):
    """The prefill segment is missing, gone, or fails the ownership/mode/format checks."""


class LeaseError(KVTransferError):
    """The lease is not (or no longer) granted on every block: nothing was read."""


class TransferAborted(LeaseError):
    """The prefill side reclaimed a block while it was being copied: the copy is discarded."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


class CudaUnavailableError(CudaError):
    """No usable NVIDIA GPU or driver: the CUDA IPC transport cannot run on this host."""
