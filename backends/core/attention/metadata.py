"""One step's attention metadata: the packed batch, flat (varlen), built once per step.

Tokens of all sequences in a step are packed along one axis (no padding): q/k/v are [N, heads,
head_dim]. Sequences [0, num_decodes) decode one token each; the rest are prefill chunks that
attend causally over their cached prefix plus their new tokens. The record holds what any
kernel needs (cu_seqlens, positions, slot mapping, block tables, context lengths) plus `plan`,
the per-step state its backend derives once and every layer reuses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from backends.core.attention.registry import AttentionBackend


@dataclass(frozen=True)
class AttentionMetadata:
    num_decodes: int                  # the first num_decodes sequences decode (one token each)
    block_size: int
    query_lens: tuple[int, ...]       # [B] new tokens per sequence (host copy, for loops)
    context_lens: tuple[int, ...]     # [B] cached + new tokens per sequence
    cu_seqlens_q: torch.Tensor        # [B + 1] int32: sequence b's new tokens are rows [cu[b], cu[b+1])
    positions: torch.Tensor           # [N] int64 position of each new token in its sequence
    slot_mapping: torch.Tensor        # [N] int64 block_id * block_size + offset of its K/V
    block_tables: torch.Tensor        # [B, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor            # [B] int32 context_lens on the device
    backend: AttentionBackend
    plan: Any = None                  # the backend's per-step state (AttentionBackend.plan)

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens) or not self.query_lens:
            raise ValueError(f"query_lens {self.query_lens} and context_lens {self.context_lens} "
                             "must be non-empty and of one length")
        if not 0 <= self.num_decodes <= len(self.query_lens):
            raise ValueError(f"num_decodes {self.num_decodes} out of [0, {len(self.query_lens)}]")
        if any(not 0 < q <= c for q, c in zip(self.query_lens, self.context_lens)):
            raise ValueError(f"need 0 < query_len <= context_len, got {self.query_lens}, {self.context_lens}")

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_prefill(self) -> bool:
        return self.num_decodes == 0

    @property
    def is_decode(self) -> bool:
        return self.num_decodes == len(self.query_lens)

    @classmethod
    def build(cls, num_decodes: int, query_lens: list[int], context_lens: list[int],
              tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """The step's record for the backend registered for `device`'s type, planned."""
        from backends.core.attention.registry import backend_for
        backend = backend_for(device)
        slots, positions, cu = [], [], [0]
        for qlen, clen, table in zip(query_lens, context_lens, tables):
            for pos in range(clen - qlen, clen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.extend(range(clen - qlen, clen))
            cu.append(cu[-1] + qlen)
        max_blocks = max(-(-c // block_size) for c in context_lens)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        meta = cls(num_decodes, block_size, tuple(query_lens), tuple(context_lens),
                   torch.tensor(cu, dtype=torch.int32, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device),
                   torch.tensor(padded, dtype=torch.long, device=device),
                   torch.tensor(context_lens, dtype=torch.int32, device=device), backend)
        return replace(meta, plan=backend.plan(meta, tables))
