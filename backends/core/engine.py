"""The engine: one model, one KV pool, one scheduler. `step()` = schedule, execute, update.

Roles: "both" runs prefill and decode (the colocated engine), with whole prompts pre-empting
the decode batch for a step, or with `chunked_prefill` prompt chunks riding in the decode steps
(a sequence yields its first token once its last chunk has run); "prefill" stops each sequence
after its first token and keeps its KV blocks for hand-off (`export_kv`, then `release`);
"decode" takes sequences whose KV was computed elsewhere (`add_prefilled`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from backends.core.config import ModelConfig
from backends.core.kv_cache import BlockManager, KVLayout, KVPool, dtype_from_name
from backends.core.model_runner import ModelRunner, build_model, resolve_device
from backends.core.sampling import SamplingParams
from backends.core.scheduler import Batch, Scheduler, SchedulerConfig
from backends.core.sequence import FinishReason, Sequence, SequenceStatus
from backends.core.quant import INT4_GROUP_SIZES
from backends.core.weight_format import WEIGHT_FORMATS, resolve_format
from backends.core.weight_share import checkpoint_key, release_free_memory, share_weights, weights_key

Role = Literal["both", "prefill", "decode"]
KV_DTYPES = ("auto", "bfloat16", "float32", "int8")


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "bfloat16"
    block_size: int = 16
    num_kv_blocks: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None       # default: the model's context length
    role: Role = "both"
    device: str = "cpu"                     # or "cuda[:N]"
    chunked_prefill: bool = False           # mixed steps under max_num_batched_tokens (role "both")
    weights: str = "auto"                   # WEIGHT_FORMATS (weight_format.py): bf16 int8 int4 auto
    weight_group_size: int = 32             # int4 groups along the input (HF weights quantized on load)
    kv_dtype: str = "auto"                  # KV_DTYPES: "auto" = the activation dtype
    shared_weights_dir: str | None = None   # instances on one host map one copy of the weights here
    prepack_weights: bool = True            # dense weights in oneDNN's layout (bf16 on CPU; private)

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
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        if self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.chunked_prefill and self.role != "both":
            raise ValueError(f"chunked_prefill needs role 'both' (it mixes prefill chunks into "
                             f"decode steps), got role {self.role!r}")


@dataclass
class StepOutput:
    req_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_blocks_used: int
    num_blocks_total: int
    last_batch_size: int = 0
    last_batch_tokens: int = 0


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
        self.blocks = BlockManager(engine_config.num_kv_blocks)
        self.scheduler = Scheduler(SchedulerConfig(engine_config.max_num_seqs,
                                                   engine_config.max_num_batched_tokens,
                                                   engine_config.block_size,
                                                   engine_config.chunked_prefill,
                                                   hand_off=engine_config.role == "prefill"), self.blocks)
        self.seqs: dict[str, Sequence] = {}
        self.last_batch: Batch | None = None           # the latest step's batch

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
                          f"prepack={engine_config.prepack_weights}", torch.__version__)
        share_weights(model, engine_config.shared_weights_dir, key, device)

    @staticmethod
    def kv_layout(config: ModelConfig, engine_config: EngineConfig) -> KVLayout:
        """The KV pool's layout: kv_dtype, or the activation dtype when it is "auto"."""
        kv_dtype = engine_config.dtype if engine_config.kv_dtype == "auto" else engine_config.kv_dtype
        return KVLayout.for_model(config, engine_config.num_kv_blocks, engine_config.block_size,
                                  kv_dtype)

    @property
    def kv(self) -> KVPool:
        return self.runner.kv

    # -- requests -------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is "
                             f"{self.max_model_len}, so at most {self.max_model_len - 1} fit")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        need = -(-len(prompt_ids) // self.config.block_size)
        if need > self.config.num_kv_blocks:
            raise ValueError(f"prompt needs {need} KV blocks; this engine has {self.config.num_kv_blocks}")

    def add_request(self, req_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if self.config.role == "decode":
            raise RuntimeError("a decode engine takes prefilled sequences: use add_prefilled")
        self._check_new(req_id)
        self.validate_prompt(prompt_ids)
        seq = Sequence(req_id, list(prompt_ids), params)
        self.seqs[req_id] = seq
        self.scheduler.add(seq)

    def abort(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            seq.finish_reason = FinishReason.ABORT
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _check_new(self, req_id: str) -> None:
        if req_id in self.seqs:
            raise ValueError(f"request id {req_id!r} is already in use")

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        self.last_batch = batch
        if batch is None:
            return []
        token_ids = self.runner.execute(batch)
        results = self.scheduler.update(batch, token_ids, self._finish_reason)
        for seq, _, reason in results:
            if reason is not None:
                del self.seqs[seq.req_id]
        return [StepOutput(seq.req_id, [tok], reason is not None, reason) for seq, tok, reason in results]

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def stats(self) -> EngineStats:
        b = self.last_batch
        return EngineStats(len(self.scheduler.waiting), len(self.scheduler.running),
                           self.blocks.num_used, self.blocks.num_blocks,
                           len(b.seqs) if b else 0, b.num_tokens if b else 0)

    # -- disaggregation seam --------------------------------------------------------------
    def export_kv(self, req_id: str) -> tuple[list[int], int]:
        """(block ids, tokens cached) of a PREFILLED sequence; blocks stay held until release."""
        seq = self.seqs.get(req_id)
        if seq is None or seq.status != SequenceStatus.PREFILLED:
            raise KeyError(f"no prefilled sequence {req_id!r} to export")
        return list(seq.block_ids), seq.num_cached

    def release(self, req_id: str) -> None:
        """Free a PREFILLED sequence's blocks once its KV has been handed off."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.scheduler.finish(seq)

    def add_prefilled(self, req_id: str, prompt_ids: list[int], first_token_id: int,
                      params: SamplingParams, num_blocks: int) -> list[int]:
        """Admit a sequence whose prompt KV was computed elsewhere.

        Allocates `num_blocks` blocks and returns their ids: the caller copies the prompt's KV
        into them, then calls `start_decoding(req_id)`. Raises MemoryError if no room.
        """
        if self.config.role == "prefill":
            raise RuntimeError("a prefill engine does not decode")
        self._check_new(req_id)
        self.validate_prompt(prompt_ids)
        if num_blocks != -(-len(prompt_ids) // self.config.block_size):
            raise ValueError(f"{num_blocks} blocks do not fit a {len(prompt_ids)}-token prompt")
        if params.seed is None:
            raise ValueError("a prefilled sequence must carry its seed")
        seq = Sequence(req_id, list(prompt_ids), params, output_ids=[first_token_id])
        block_ids = self.scheduler.admit_prefilled(seq, num_blocks)
        self.seqs[req_id] = seq
        return block_ids

    def start_decoding(self, req_id: str) -> None:
        self.scheduler.start_decoding(self.seqs[req_id])

    def can_admit(self, num_blocks: int) -> bool:
        return self.scheduler.can_admit(num_blocks)
