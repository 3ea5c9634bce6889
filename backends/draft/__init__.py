"""A drafter on cores of its own (issue 13's disaggregated drafter): a process per decode
instance (server.py) that hears each sequence's new tokens and proposes ahead, and the
instance's client (client.py) whose ready proposals the Speculator verifies without waiting."""
from __future__ import annotations

from backends.core.spec_policy import AdaptiveK, Speculator
from backends.draft.client import DrafterSpec, RemoteDrafter, aligned_draft

__all__ = ["DrafterSpec", "RemoteDrafter", "aligned_draft", "remote_speculator"]


def remote_speculator(method: str, max_k: int, cores: tuple[int, ...], vocab_size: int,
                      max_len: int, **policy_kw) -> Speculator:
    """A Speculator whose drafts come from a drafter process pinned to `cores`: proposals of
    2 x max_k tokens (the rest of one the target partly accepted still serves a step later),
    k adapted as for an in-process drafter (AdaptiveK, `policy_kw`)."""
    spec = DrafterSpec(method, num_draft=2 * max_k, vocab_size=vocab_size, cores=tuple(cores),
                       max_len=max_len)
    return Speculator(RemoteDrafter(spec), AdaptiveK(max_k, **policy_kw))
