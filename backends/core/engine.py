"""The engine: one model, one KV pool, one scheduler. `step()` = schedule, execute, update.

Roles: "both" runs prefill and decode (the colocated engine), with whole prompts pre-empting
the decode batch for a step, or with `chunked_prefill` prompt chunks riding in the decode steps
(a sequence yields its first token once its last chunk has run); "prefill" stops each sequence
after its first token and keeps its KV blocks for hand-off (`export_kv`, then `release`);
"decode" takes sequences whose KV was computed elsewhere (`add_prefilled`, then `admit_remote`
hands out the ones whose KV to copy in now, and `kv_arrived` lets each join the batch), and,
with `chunked_prefill`, prompts too, prefilled locally in chunks inside its decode steps
(adaptive disaggregation: the router sends a cheap prompt there when that keeps both SLOs).

With `prefix_caching` (the default, every role) the block manager keeps full KV blocks after
their requests end and a prompt reuses its longest cached prefix (backends/core/prefix_cache.py);
a decode instance registers the prompt blocks it copied in and the blocks its steps fill.

A request is validated once, where it enters: `make_sequence` checks it against this engine
(context length, vocabulary, KV pool) and may run on any thread; `add` only registers it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from backends.core.config import ModelConfig
from backends.core.kv_cache import BlockManager, KVLayout, KVPool, dtype_from_name
from backends.core.limits import EngineLimits
from backends.core.model_runner import ModelRunner, build_model, resolve_device
from backends.core.prefix_cache import PrefixCache, PrefixStats
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch, Scheduler
from backends.core.sequence import FinishReason, Sequence, SequenceStatus
from backends.core.spec_decode import SpecStats
from backends.core.quant import INT4_GROUP_SIZES, native_int4_enabled, widen_dense
from backends.core.weight_format import WEIGHT_FORMATS, resolve_format
from backends.core.weight_share import checkpoint_key, release_free_memory, share_weights, weights_key

Role = Literal["both", "prefill", "decode"]
KV_DTYPES = ("auto", "bfloat16", "float32", "int8")


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "bfloat16"
    limits: EngineLimits = EngineLimits()   # KV blocks, batch caps, block size, chunked prefill
    max_model_len: int | None = None       # default: the model's context length
    role: Role = "both"
    device: str = "cpu"                     # or "cuda[:N]"
    weights: str = "auto"                   # WEIGHT_FORMATS (weight_format.py): bf16 int8 int4 auto
    weight_group_size: int = 32             # int4 groups along the input (HF weights quantized on load)
    kv_dtype: str = "auto"                  # KV_DTYPES: "auto" = the activation dtype
    shared_weights_dir: str | None = None   # instances on one host map one copy of the weights here
    prepack_weights: bool = True            # dense weights in oneDNN's layout (bf16 on CPU; private)
    prefix_caching: bool = True             # reuse cached KV blocks of earlier prompts (prefix_cache.py)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.weight_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"weight_group_size must be one of {INT4_GROUP_SIZES}, "
                             f"got {self.weight_group_size!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        if not isinstance(self.limits, EngineLimits):
            raise ValueError(f"limits must be an EngineLimits, got {type(self.limits).__name__}")
        if self.limits.chunked_prefill and self.role == "prefill":
            raise ValueError("chunked_prefill mixes prefill chunks into decode steps: a prefill "
                             "engine has none")


@dataclass
class StepOutput:
    req_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    seq: Sequence | None = None         # its state after the step (timing: arrival, scheduled)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_blocks_used: int                # held by a sequence (a KV lease's included)
    num_blocks_total: int
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    num_blocks_cached: int = 0          # free, but holding cached KV (evictable; not a leak)
    prefix: PrefixStats = field(default_factory=PrefixStats)


class LLMEngine:
    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                 engine_config: EngineConfig = EngineConfig(), kv_pool: KVPool | None = None,
                 eos_token_ids: tuple[int, ...] | None = None, checkpoint_id: str | None = None) -> None:
        """`checkpoint_id` names the checkpoint the state dict came from (weight_share.checkpoint_key);
        with `engine_config.shared_weights_dir` the weights are then shared with every instance
        on this host that loads the same checkpoint in the same format."""
        self.model_config = config
        self.config = engine_config
        self.max_model_len = min(engine_config.max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings)
        self.eos_token_ids = frozenset(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        device = resolve_device(engine_config.device)
        layout = self.kv_layout(config, engine_config)
        if kv_pool is not None and kv_pool.layout != layout:
            raise ValueError(f"KV pool layout {kv_pool.layout} does not match the engine's {layout}")
        kv_pool = kv_pool if kv_pool is not None else KVPool(layout, device=device)
        if kv_pool.data.device != device:
            raise ValueError(f"KV pool is on {kv_pool.data.device}, the engine on {device}")
        model = build_model(config, state_dict, engine_config.dtype, device, engine_config.weights,
                            engine_config.role, engine_config.weight_group_size,
                            engine_config.prepack_weights)
        if engine_config.shared_weights_dir:
            self._share(model, engine_config, checkpoint_id, device)
        release_free_memory()       # the loader's freed dense copies, back to the OS (~600 MiB)
        self.runner = ModelRunner(model, kv_pool)
        limits = engine_config.limits
        cache = PrefixCache(limits.block_size) if engine_config.prefix_caching else None
        self.blocks = BlockManager(limits.num_kv_blocks, cache)
        self.scheduler = Scheduler(limits, self.blocks, hand_off=engine_config.role == "prefill",
                                   eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        self.last_batch: Batch | None = None           # the latest step's batch
        self.spec_stats = SpecStats()                   # speculative decoding's verify rows

    @classmethod
    def from_path(cls, path: str, engine_config: EngineConfig = EngineConfig(), **kw) -> LLMEngine:
        from backends.core.weights import load_checkpoint
        config, sd = load_checkpoint(path, dtype=dtype_from_name(engine_config.dtype),
                                     keep_quantized=engine_config.weights != "bf16")
        kw.setdefault("checkpoint_id", checkpoint_key(path))
        return cls(config, sd, engine_config, **kw)

    @staticmethod
    def _share(model, engine_config: EngineConfig, checkpoint_id: str | None, device) -> None:
        if checkpoint_id is None:
            raise ValueError("shared_weights_dir needs the checkpoint's identity (checkpoint_id)")
        fmt = resolve_format(engine_config.weights, engine_config.role, device, engine_config.dtype)
        key = weights_key(checkpoint_id, fmt, engine_config.dtype, str(engine_config.weight_group_size),
                          f"prepack={engine_config.prepack_weights}", torch.__version__,
                          f"native_int4={native_int4_enabled(dtype_from_name(engine_config.dtype))}",
                          f"wide={widen_dense(dtype_from_name(engine_config.dtype), device)}")
        share_weights(model, engine_config.shared_weights_dir, key, device)

    @staticmethod
    def kv_layout(config: ModelConfig, engine_config: EngineConfig) -> KVLayout:
        """The KV pool's layout: kv_dtype, or the activation dtype when it is "auto"."""
        kv_dtype = engine_config.dtype if engine_config.kv_dtype == "auto" else engine_config.kv_dtype
        return KVLayout.for_model(config, engine_config.limits.num_kv_blocks,
                                  engine_config.limits.block_size, kv_dtype)

    @property
    def kv(self) -> KVPool:
        return self.runner.kv

    # -- requests -------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int], extra_tokens: int = 0) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is "
                             f"{self.max_model_len}, so at most {self.max_model_len - 1} fit")
        vocab = self.model_config.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        limits = self.config.limits
        need = limits.blocks_for(len(prompt_ids) + extra_tokens)
        if need > limits.num_kv_blocks:
            raise ValueError(f"prompt needs {need} KV blocks; this engine has {limits.num_kv_blocks}")

    def make_sequence(self, req_id: str, prompt_ids: list[int], params: SamplingParams,
                      first_token_id: int | None = None, arrival_time: float = 0.0) -> Sequence:
        """A validated sequence for `add` (any thread). `first_token_id`: prefilled elsewhere
        (a decode engine), so its prompt KV is to be copied in and it must carry its seed."""
        role = self.config.role
        if role == "prefill" and first_token_id is not None:
            raise ValueError("a prefill engine takes prompts, not prefilled sequences")
        if role == "decode" and first_token_id is None and not self.config.limits.chunked_prefill:
            raise ValueError("this decode engine takes prefilled sequences (with their first "
                             "token); a prompt needs chunked_prefill (local prefill in decode steps)")
        self.validate_prompt(prompt_ids, 0 if first_token_id is None else 1)
        if first_token_id is None:
            return Sequence(req_id, list(prompt_ids), params, arrival_time=arrival_time)
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise ValueError(f"first token id {first_token_id} out of range")
        if params.seed is None:
            raise ValueError("a prefilled sequence must carry its seed")
        return Sequence(req_id, list(prompt_ids), params, output_ids=[first_token_id],
                        arrival_time=arrival_time, first_token_time=arrival_time)

    def add(self, seq: Sequence) -> None:
        """Register a sequence from `make_sequence`: it waits for a prefill batch, or (decode)
        for admission and its KV."""
        if seq.req_id in self.seqs:
            raise ValueError(f"request id {seq.req_id!r} is already in use")
        self.seqs[seq.req_id] = seq
        if seq.output_ids:
            self.scheduler.add_remote(seq)
        else:
            self.scheduler.add(seq)

    def add_request(self, req_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.add(self.make_sequence(req_id, prompt_ids, params, arrival_time=time.monotonic()))

    def add_prefilled(self, req_id: str, prompt_ids: list[int], first_token_id: int,
                      params: SamplingParams) -> None:
        """Queue a sequence whose prompt KV was computed elsewhere (see `admit_remote`)."""
        self.add(self.make_sequence(req_id, prompt_ids, params, first_token_id, time.monotonic()))

    def abort(self, req_id: str) -> None:
        """Drop a request and free its blocks. Not while its KV is being copied in."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            seq.finish_reason = FinishReason.ABORT
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------
    def step(self, now: float | None = None, token_budget: int | None = None,
             drafts: dict[str, list[int]] | None = None) -> list[StepOutput]:
        """One step; `token_budget`: this step's tokens (chunked policy), see Scheduler.schedule.
        `drafts`: proposed tokens by request id (spec_decode.propose_drafts); a decoding
        sequence verifies its draft this step and may yield several tokens."""
        if drafts:
            self._check_drafts(drafts)
        batch = self.scheduler.schedule(time.monotonic() if now is None else now, token_budget, drafts)
        self.last_batch = batch
        if batch is None:
            return []
        if batch.drafts:
            new_ids = self.runner.verify(batch)
        else:
            new_ids = [[t] for t in self.runner.execute(batch)]
        results = self.scheduler.update_accepted(batch, new_ids)
        for seq, ids, reason in results:
            if reason is not None:
                del self.seqs[seq.req_id]
            if seq in batch.drafts:
                self.spec_stats.record(len(batch.drafts[seq]), len(ids))
        return [StepOutput(seq.req_id, ids, reason is not None, reason, seq)
                for seq, ids, reason in results]

    def _check_drafts(self, drafts: dict[str, list[int]]) -> None:
        vocab = self.model_config.vocab_size
        for req_id, draft in drafts.items():
            if any(not 0 <= t < vocab for t in draft):
                raise ValueError(f"draft for {req_id!r} has token ids out of range [0, {vocab})")

    def stats(self) -> EngineStats:
        b = self.last_batch
        s = self.scheduler
        cache = self.blocks.cache
        return EngineStats(s.num_queued(), len(s.running) + len(s.loading), self.blocks.num_used,
                           self.blocks.num_blocks, len(b.seqs) if b else 0, b.num_tokens if b else 0,
                           self.blocks.num_cached_free, replace(cache.stats) if cache else PrefixStats())

    # -- disaggregation seam --------------------------------------------------------------
    def export_kv(self, req_id: str) -> tuple[list[int], int]:
        """(block ids, tokens cached) of a PREFILLED sequence; blocks stay held until release."""
        seq = self.seqs.get(req_id)
        if seq is None or seq.status != SequenceStatus.PREFILLED:
            raise KeyError(f"no prefilled sequence {req_id!r} to export")
        return list(seq.block_ids), seq.num_cached

    def release(self, req_id: str) -> None:
        """Free a PREFILLED sequence's blocks once its KV has been handed off."""
        self.abort(req_id)

    def admit_remote(self) -> list[Sequence]:
        """Prefilled sequences admitted now (scheduler policy): copy each one's prompt KV into
        its `block_ids`, then call `kv_arrived` (or `abort` once the copy is over, if it failed)."""
        return self.scheduler.admit_remote()

    def kv_arrived(self, req_id: str) -> None:
        self.scheduler.kv_arrived(self.seqs[req_id])
