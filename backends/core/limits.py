"""An engine's limits, in one place: from the deployment (deploy.deployment.PhaseSpec) to the
engine (EngineConfig.limits), its scheduler and the planner's simulator (InstanceSpec.limits).

No torch here: the deployment loader imports it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    num_kv_blocks: int = 1024
    max_num_seqs: int = 32                  # sequences in one batch (decode batch cap)
    max_num_batched_tokens: int = 2048      # tokens per prefill batch (L_m), or per step if chunked
    block_size: int = 16                    # tokens per KV block
    chunked_prefill: bool = False           # prefill chunks ride in decode steps (Sarathi-Serve)

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.chunked_prefill, bool):
            raise ValueError(f"chunked_prefill must be true or false, got {self.chunked_prefill!r}")
        if self.chunked_prefill and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}) with chunked_prefill: every "
                             "running sequence's decode token must fit in one step")

    def blocks_for(self, num_tokens: int) -> int:
        """KV blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)
