"""Speculative decoding as the planner's simulator runs it (backends/core/spec_decode.py serves it).

A decode (or colocated) instance with `Speculation(k, acceptance)` verifies k draft tokens for
every decoding sequence at every step, through the same scheduler calls as the served engine
(`Scheduler.schedule(drafts=...)` reserves the draft's KV slots, `update_accepted` keeps the
accepted run plus the target's own token and gives back the rest). Each draft token is accepted
with probability `acceptance` given the ones before it (seeded), so a verify row yields
1 + a + ... + a^k tokens on average (`tokens_per_step`, what the router divides a step's time by).
A verify row costs its 1 + k tokens as decode rows, each over the sequence's context
(`step_rows`). The acceptance to give is the one measured on the served instance for the
workload (a decode instance's stats: `spec_acceptance_ewma`; docs/spec_decode.md per workload);
the served instance adapts k to it and to step costs, the simulation keeps k fixed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from backends.core.scheduler import Batch, Scheduler

MAX_K = 16                   # deploy.deployment.MAX_SPECULATIVE_TOKENS


@dataclass(frozen=True)
class Speculation:
    k: int                   # draft tokens each decoding sequence verifies a step
    acceptance: float        # a draft token's chance of being accepted, given the ones before it

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise ValueError(f"speculation k must be an integer in [1, {MAX_K}], got {self.k!r}")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"speculation acceptance must be in [0, 1], got {self.acceptance!r}")

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a verify row yields: 1 + a + ... + a^k."""
        return sum(self.acceptance ** j for j in range(self.k + 1))

    def drafts(self, scheduler: Scheduler) -> dict[str, list[int]]:
        """A k-token draft (dummy ids, as the simulated tokens) for each decoding sequence; the
        scheduler clips each to what fits, as it does a served drafter's."""
        return {q.req_id: [0] * self.k for q in scheduler.running if q.num_tokens - q.num_cached == 1}

    def new_ids(self, batch: Batch, rng: random.Random) -> list[list[int]]:
        """Each sampled sequence's tokens this step: a verify row's accepted run plus one."""
        out = []
        for seq in batch.sampled_seqs:
            accepted = 0
            for _ in batch.drafts.get(seq, ()):
                if rng.random() >= self.acceptance:
                    break
                accepted += 1
            out.append([0] * (accepted + 1))
        return out


def step_rows(batch: Batch) -> tuple[int, int, list[int]]:
    """(rows, context, prompt rows) of a step: its decode rows and verify rows (a verify row's
    1 + k tokens count as that many decode rows, each over the sequence's context), and the
    indices of its prompt rows (priced as prefill)."""
    rows = ctx = 0
    prompts = []
    for i, q in enumerate(batch.seqs):
        if i < batch.num_decodes or q in batch.drafts:
            rows += batch.num_new[i]
            ctx += batch.num_new[i] * q.num_tokens
        else:
            prompts.append(i)
    return rows, ctx, prompts
