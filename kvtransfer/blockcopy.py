"""Block copies between block-major pools: one contiguous copy per run of adjacent blocks.

CPU copies go through numpy byte views (a plain memcpy on the calling thread). torch's `copy_`
splits an 11.8 MB copy across its intra-op threads; on our 2-core hosts under load that took
12-16 ms instead of about 1 ms single-threaded, so the transfer does not depend on torch's pool.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both sides are consecutive block ids.

    A block-major pool stores each block contiguously, so each run is one memcpy.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def block_bytes(data: torch.Tensor) -> np.ndarray:
    """A [num_blocks, block_nbytes] uint8 view sharing memory with a contiguous CPU pool tensor."""
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError("block_bytes needs a contiguous CPU tensor")
    return data.view(torch.uint8).reshape(data.shape[0], -1).numpy()


def copy_blocks(src: np.ndarray, dst: np.ndarray, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """dst[dst_ids] = src[src_ids] for [num_blocks, block_nbytes] byte views."""
    for s, d, n in block_runs(src_ids, dst_ids):
        dst[d:d + n] = src[s:s + n]
