"""A draft model as a drafter: a second, smaller engine proposes each sequence's greedy
continuation (spec_decode.Drafter), for a target that shares its tokenizer.

    drafter = ModelDrafter("models/small.gguf", vocab_size=target_vocab)
    drafter.propose(token_ids, k)                 # one sequence
    drafter.propose_many([ids_a, ids_b], k)       # one batched pass for several

The drafter is an LLMEngine of its own (its weights, its KV pool, prefix caching on): each
proposal is a request of the sequence's whole history, greedy, exactly k tokens. Its prefix
cache keeps the history's full blocks between proposals, so a proposal computes only the tokens
since the last full block, then k - 1 decode steps; `propose_many` runs every sequence's
request in the same steps. Greedy drafts are deterministic (draft probability 1 for the token
proposed), so the target accepts them with spec_decode.accept_draft, as n-gram drafts: the
output is token-for-token the target's own.

What it costs is a draft model's forward passes: it pays only where the draft model is much
cheaper per token than the target (docs/spec_decode.md measures it). Run it in a drafter
process on cores of its own (decode.draft_devices) to keep its passes off the target's step.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.sampling import SamplingParams


CALIBRATE_TOKENS = 256          # a calibration call's history: its prefill times the backlog


class ModelDrafter:
    def __init__(self, model: str | None = None, *, engine: LLMEngine | None = None,
                 vocab_size: int | None = None, weights: str = "auto", dtype: str = "bfloat16",
                 num_kv_blocks: int = 1024, max_num_seqs: int = 32, max_model_len: int | None = None) -> None:
        """`model`: the draft checkpoint's path (or `engine`, built already). `vocab_size`: the
        target's; a draft model with another vocabulary cannot draft for it."""
        if (model is None) == (engine is None):
            raise ValueError("ModelDrafter needs the draft model's path or an engine, not both")
        if engine is None:
            limits = EngineLimits(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max(2048, max_num_seqs))
            engine = LLMEngine.from_path(model, EngineConfig(dtype=dtype, weights=weights, limits=limits,
                                                             max_model_len=max_model_len))
        if engine.config.role != "both":
            raise ValueError(f"a draft engine runs prompts and decodes: role 'both', got {engine.config.role!r}")
        draft_vocab = engine.model_config.vocab_size
        if vocab_size is not None and vocab_size != draft_vocab:
            raise ValueError(f"the draft model's vocabulary has {draft_vocab} tokens, the target's "
                             f"{vocab_size}: a draft model must share the target's tokenizer")
        self.engine = engine
        self._ids = itertools.count()

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return self.propose_many([token_ids], k)[0]

    def calibrate(self, k: int, clock=time.perf_counter, history: int = CALIBRATE_TOKENS) -> list[tuple[int, float, int]]:
        """Time the drafter before any real sequence asks (as Speculator starts): a call whose
        sequence brings `history` unseen tokens (a new sequence's prompt, prefilled first), then
        one that brings a single token (every step's), after a throwaway call that builds the
        kernels. (k, seconds, backlog) for each, for AdaptiveK.observe_drafting. Without it the
        first real call is timed instead, and for a long prompt it is a prefill (seconds, in a
        decode step). The synthetic histories stay in the prefix cache, evictable."""
        vocab = self.engine.model_config.vocab_size
        ids = [(7 * i + 11) % (vocab - 1) + 1 for i in range(history + 1)]
        self.propose(ids[:16][::-1], k)                           # kernels
        out = []
        for tokens, backlog in ((ids[:-1], history), (ids, 1)):
            started = clock()
            self.propose(tokens, k)
            out.append((k, clock() - started, backlog))
        return out

    def propose_many(self, histories: Seq[list[int]], k: int) -> list[list[int]]:
        """Each history's greedy continuation of up to k tokens (fewer where the draft model's
        context ends; [] for a history it cannot hold), computed in shared steps."""
        engine, out = self.engine, [[] for _ in histories]
        if k <= 0:
            return out
        req = {}
        for i, ids in enumerate(histories):
            n = min(k, engine.max_model_len - len(ids))
            if n <= 0 or not ids:
                continue
            try:
                engine.validate_prompt(ids, n)
            except ValueError:                    # out of its vocabulary, context or pool
                continue
            req_id = f"draft-{next(self._ids)}"
            params = SamplingParams(max_tokens=n, temperature=0.0, seed=0, ignore_eos=True)
            engine.add_request(req_id, list(ids), params)
            req[req_id] = i
        try:
            while req.keys() & engine.seqs.keys():
                for o in engine.step():
                    if o.req_id in req:
                        out[req[o.req_id]].extend(o.new_token_ids)
        finally:
            for req_id in req:                    # an exception mid-step leaves nothing held
                engine.abort(req_id)
        return out
