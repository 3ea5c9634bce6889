"""A drafter on cores of its own (issue 13's disaggregated drafter): a process per decode
instance (server.py) that hears each sequence's new tokens and proposes ahead, and the
instance's client (client.py) whose ready proposals the Speculator verifies without waiting."""
from __future__ import annotations

import json

from backends.core.spec_policy import AdaptiveK
from backends.core.speculator import Speculator
from backends.draft.client import DrafterSpec, RemoteDrafter, aligned_draft

__all__ = ["DrafterSpec", "RemoteDrafter", "aligned_draft", "remote_drafter", "remote_speculator"]


def remote_drafter(method: str, max_k: int, cores: tuple[int, ...], vocab_size: int,
                   max_len: int, drafter_options: dict | None = None) -> RemoteDrafter:
    """A drafter process pinned to `cores` for a Speculator of up to max_k draft tokens: its
    proposals are 2 x max_k long (the rest of one the target partly accepted still serves a
    step later). `drafter_options`: the drafter's keywords."""
    return RemoteDrafter(DrafterSpec(method, num_draft=2 * max_k, vocab_size=vocab_size,
                                     cores=tuple(cores), max_len=max_len,
                                     options=json.dumps(drafter_options or {})))


def remote_speculator(method: str, max_k: int, cores: tuple[int, ...], vocab_size: int,
                      max_len: int, drafter_options: dict | None = None, **policy_kw) -> Speculator:
    """A Speculator drafting with `remote_drafter(...)`, k adapted as for an in-process drafter
    (AdaptiveK, `policy_kw`)."""
    return Speculator(remote_drafter(method, max_k, cores, vocab_size, max_len, drafter_options),
                      AdaptiveK(max_k, **policy_kw))
