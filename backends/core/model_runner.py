"""Owns the model weights, the KV pool and the torch threads of one engine."""
from __future__ import annotations

import os

import torch

from backends.core.attention import AttentionMetadata
from backends.core.config import ModelConfig
from backends.core.kv_cache import KVLayout, KVPool
from backends.core.logits_processors import process_batch
from backends.core.model import CausalLM, rope_cos_sin
from backends.core.opt import OPTCausalLM
from backends.core.quant import GroupQuant
from backends.core.weight_format import apply_weight_format, resolve_format
from backends.core.sampling import sample
from backends.core.scheduler import Batch
from backends.core.spec_decode import accept_draft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'cpu' or 'cuda[:N]', checked now so a GPU deployment on a host without one fails clearly."""
    if not isinstance(name, str) or not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise RuntimeError(f"device {name!r} needs an NVIDIA GPU and driver, but torch ({build}) "
                           "sees none on this host; deploy this phase on cpu instead")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


def pin_threads(cores: list[int] | None, num_threads: int | None = None) -> None:
    """Pin this process to `cores` and match torch's thread count. Call before the first torch op."""
    if cores:
        os.sched_setaffinity(0, set(cores))
    n = num_threads or (len(cores) if cores else None)
    if n:
        torch.set_num_threads(n)


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor | GroupQuant],
                dtype: str, device: torch.device = torch.device("cpu"), weights: str = "bf16",
                role: str = "both", group_size: int = 32, prepack: bool = False) -> CausalLM | OPTCausalLM:
    """The model in `dtype` on `device`, its linear layers in the `weights` format (see
    weight_format.py); `state_dict` may hold GGUF codes (load_checkpoint(keep_quantized=True))."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(DTYPES)}")
    fmt = resolve_format(weights, role, device, dtype)
    dense = {k: v.dequantize(DTYPES[dtype]) if isinstance(v, GroupQuant) else v
             for k, v in state_dict.items()}
    model_cls = OPTCausalLM if config.arch == "opt" else CausalLM
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device=device).to(DTYPES[dtype])
    if isinstance(model, CausalLM):
        # RoPE tables stay float32 (cast per step, as HF does); meta tensors had no values.
        cos, sin = rope_cos_sin(config, config.max_position_embeddings)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.load_hf_state_dict(dense)
    del dense
    apply_weight_format(model, state_dict, fmt, group_size, prepack)
    return model.eval()


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVPool) -> None:
        self.model = model
        self.kv = kv
        self.block_size = kv.layout.block_size
        self.device = kv.data.device

    def execute(self, batch: Batch) -> list[int]:
        """Run one packed forward over `batch`; one token for each of `batch.sampled_seqs`."""
        seqs = batch.sampled_seqs
        logits = process_batch(self.forward_logits(batch), seqs)
        return sample(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs])

    def verify(self, batch: Batch) -> list[list[int]]:
        """Like `execute` for a batch with verify rows: each sampled row's tokens, the accepted
        part of its draft then one of the target's own (spec_decode.accept_draft)."""
        logits = process_batch(self.forward_logits(batch), batch.sampled_seqs, batch.drafts)
        out, row = [], 0
        for s in batch.sampled_seqs:
            draft = batch.drafts.get(s, [])
            out.append(accept_draft(logits[row:row + len(draft) + 1], draft, s.params,
                                    s.num_output_tokens))
            row += len(draft) + 1
        return out

    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """Write the new tokens' K/V into the pool; return next-token logits [S, V] float32 of
        the S sequences whose last token ran (a prompt chunk short of the end yields none), a
        verify row's at each of its 1 + k positions. Pure: no sequence changes here (the
        scheduler's `update` advances `num_cached`). Cached blocks a sequence takes as copies
        (`batch.copies`, prefix caching on a prefill engine) are copied first."""
        if batch.copies:
            src, dst = zip(*batch.copies)
            self.kv.write_blocks(list(dst), self.kv.read_blocks(list(src)))
        ids, positions, context_lens, last = [], [], [], []
        drafts = batch.drafts
        for s, n, is_sampled in zip(batch.seqs, batch.num_new, batch.is_sampled):
            start = s.num_cached
            draft = drafts.get(s, ()) if drafts else ()
            ids += s.token_ids(start, start + n - len(draft))
            ids += draft
            positions += range(start, start + n)
            context_lens.append(start + n)
            if is_sampled:
                last += range(len(ids) - 1 - len(draft), len(ids))
        meta = AttentionMetadata.build(batch.num_decodes, batch.num_new, context_lens,
                                       [s.block_ids for s in batch.seqs], self.block_size, self.device)
        dev = self.device
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                            meta, self.kv)
        return self.model.logits(hidden[torch.tensor(last, dtype=torch.long, device=dev)]).cpu()
