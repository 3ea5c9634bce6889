"""The subjects that run in our own venv: our engine (one weight format each) and HF transformers.

Each runs inside a benchmarks.engine_worker process (one core, one torch thread). The spec they
get from the parent: model (path), dtype, weights (ours only), max_batch, max_seq_len (prompt +
decode steps of one decode sequence), max_prefill_len, block_size.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict

import torch

from backends.core.config import ModelConfig
from backends.core.limits import EngineLimits
from backends.core.model_runner import DTYPES
from backends.core.sampling import SamplingParams

_req_ids = itertools.count()


def module_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers, plain tensor attributes, each
    storage once), except the RoPE tables: the resident weights of one instance."""
    seen: dict[int, int] = {}
    for mod_name, mod in model.named_modules():
        tensors = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False),
                   *((k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor))]
        for name, t in tensors:
            if t is None or "rope" in f"{mod_name}.{name}" or t.device.type == "meta":
                continue
            if t.is_mkldnn:         # oneDNN-prepacked weights: opaque, no storage to read
                seen[id(t)] = t.numel() * t.element_size()
                continue
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Ours:
    """Our LLMEngine built from the checkpoint path with `EngineConfig(weights=spec["weights"])`."""

    def __init__(self, spec: dict) -> None:
        from backends.core.engine import EngineConfig, LLMEngine

        torch.set_num_threads(1)
        bs = spec["block_size"]
        num_blocks = spec["max_batch"] * -(-spec["max_seq_len"] // bs) + -(-spec["max_prefill_len"] // bs) + 2
        self.spec = spec
        limits = EngineLimits(num_blocks, spec["max_batch"],
                              max(spec["max_batch"] * spec["max_seq_len"], spec["max_prefill_len"]), bs)
        self.engine = LLMEngine.from_path(spec["model"], EngineConfig(dtype=spec["dtype"], weights=spec["weights"],
                                                                      limits=limits))

    def info(self) -> dict:
        return {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": self.spec["dtype"],
                "weights": self.spec["weights"], "weight_bytes": module_weight_bytes(self.engine.runner.model)}

    def _add(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        req_ids = [f"bench-{next(_req_ids)}" for _ in prompts]
        for req_id, ids in zip(req_ids, prompts):
            self.engine.add_request(req_id, ids, params)
        return req_ids

    def prefill(self, ids: list[int]) -> float:
        (req_id,) = self._add([ids], 2)
        try:
            t0 = time.perf_counter()
            while not any(o.req_id == req_id for o in self.engine.step()):
                pass
            return time.perf_counter() - t0
        finally:
            self.engine.abort(req_id)

    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        req_ids = self._add(prompts, steps + 1)
        try:
            while self.engine.scheduler.waiting:            # the prompts' prefill, untimed
                self.engine.step()
            return [_timed(self.engine.step) for _ in range(steps)]
        finally:
            for req_id in req_ids:
                self.engine.abort(req_id)


def hf_config(config: ModelConfig):
    import transformers

    if config.arch != "llama":
        raise ValueError(f"the HF baseline is LlamaForCausalLM; {config.arch!r} is not a llama")
    scaling = asdict(config.rope_scaling) if config.rope_scaling else {}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **scaling},
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None)


def build_hf(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: str) -> torch.nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM._from_config(hf_config(config), dtype=DTYPES[dtype])
    result = model.load_state_dict(sd, strict=False)     # copies: no storage shared with the state dict
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"HF model mismatch: missing {sorted(missing)[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


class HF:
    """transformers' LlamaForCausalLM with our checkpoint's weights, greedy, its own KV cache."""

    def __init__(self, spec: dict) -> None:
        from backends.core.weights import load_checkpoint

        torch.set_num_threads(1)
        config, sd = load_checkpoint(spec["model"], DTYPES[spec["dtype"]])
        self.spec = spec
        self.model = build_hf(config, sd, spec["dtype"])

    def info(self) -> dict:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "dtype": self.spec["dtype"],
                "weight_bytes": module_weight_bytes(self.model)}

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        return _timed(lambda: self.model(x, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1))

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = out.logits[:, -1].argmax(-1, keepdim=True)                 # greedy: [B, 1]
            out = self.model(tok, cache=out.cache, use_cache=True)
            times.append(time.perf_counter() - t0)
        return times
