"""Workloads from the DistServe paper's data sets: requests (prompt token ids, output length)
and their arrival times.

    spec = WorkloadSpec("chatbot", num_requests=200, seed=0, caps=LengthCaps(max_output_tokens=64))
    workload = load_workload(spec)                      # tokenized once, then cached under data/
    arrivals = workload.arrivals(rate=2.0)              # Poisson, seeded; cv=... for gamma

Lengths are counted with the served model's tokenizer (`backends.core.tokenizer`, default
models/SmolLM2-135M-Instruct.Q4_1.gguf); prompts are sent as those token ids, with no chat
template, and every request asks for exactly its output length (`ignore_eos`).

The workloads (raw files: client/bench/datasets.py; pools and cache: pools.py; numbers and
the exact recipe: docs/workloads.md):
- chatbot (ShareGPT): per conversation, prompt = the first human turn, output length = the
  token count of the gpt reply right after it (17,671 conversations parse; 17,335 have such
  an exchange).
- chatbot-history (ShareGPT, the rule of the DistServe artifact's dataset script): for each
  conversation of >= 3 turns, prompt = its first k turns joined by newlines with k drawn
  uniformly from 1..n-1 (fixed seed), output length = the token count of turn k, whatever
  its role. Longer, multi-turn prompts.
- code (HumanEval, as the paper): prompt = the problem's prompt, output length = the token
  count of its canonical solution (164 problems).
- summarization (a proxy: the paper used LongBench, 1900-2048-token prompts, not on PyPI).
  Prompt: a real long text, one ShareGPT conversation written out as a transcript
  ("User: ...\n\nAssistant: ..."), between a LongBench-style instruction header and footer,
  cut to L tokens with L drawn uniformly from [1900, 2048] (only conversations long enough to
  fill L are used: 7,904). Output length: drawn from the empirical lengths of real
  summaries, the gpt replies in ShareGPT to human turns that ask for a summary ("summarize" /
  "summary" / "tl;dr" in their first 300 characters) and are at least 1000 tokens long,
  leaving out replies under 16 tokens (acknowledgements): 91 replies, median ~187 tokens,
  quartiles ~125-280, i.e. short summaries, as in LongBench's summarization tasks. Both draws
  use a fixed seed (SUMMARY_SEED), so the pool is the same on every machine.
`paper_filter` (on by default) then applies the artifact's pruning: ShareGPT drops requests
whose prompt and output are both under 4 tokens and those with prompt + output >= 2048;
HumanEval the latter (it keeps all 164); the summarization proxy has its window instead.
Requests with an empty prompt or output (a few ShareGPT turns are empty) are never sent.

Caps that make a run fit a CPU (`LengthCaps`, recorded in every result file): scale prompt
and/or output lengths (prompts keep their first tokens), then truncate to a maximum or drop
the requests above it. Sampling from the pool is seeded (without replacement while the pool
lasts). Arrivals: gaps of a unit-rate renewal process, divided by the rate, so one seed gives
the same pattern at every rate (Poisson for cv=1, gamma with the given coefficient of
variation otherwise).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from .pools import DEFAULT_TOKENIZER, POOLS, Request, load_pool

WORKLOADS: tuple[str, ...] = POOLS

# The paper's pruning rule (the DistServe artifact's dataset preparation).
MIN_TOKENS, MAX_TOTAL_TOKENS = 4, 2048


@dataclass(frozen=True)
class LengthCaps:
    """Shrink lengths so a run fits a CPU. Scale first, then cap: "truncate" clips to the
    maximum, "filter" drops the requests above it."""
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    prompt_scale: float = 1.0                  # <= 1: a prompt keeps its first tokens
    output_scale: float = 1.0
    mode: Literal["truncate", "filter"] = "truncate"

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.prompt_scale <= 1:
            raise ValueError(f"prompt_scale must be in (0, 1], got {self.prompt_scale}")
        if self.output_scale <= 0:
            raise ValueError(f"output_scale must be > 0, got {self.output_scale}")
        if self.mode not in ("truncate", "filter"):
            raise ValueError(f"mode must be 'truncate' or 'filter', got {self.mode!r}")

    def apply(self, req: Request) -> Request | None:
        prompt_len = max(1, round(req.prompt_len * self.prompt_scale))
        output_len = max(1, round(req.output_len * self.output_scale))
        too_long = ((self.max_prompt_tokens is not None and prompt_len > self.max_prompt_tokens)
                    or (self.max_output_tokens is not None and output_len > self.max_output_tokens))
        if too_long and self.mode == "filter":
            return None
        prompt_len = min(prompt_len, self.max_prompt_tokens or prompt_len)
        output_len = min(output_len, self.max_output_tokens or output_len)
        return Request(req.prompt_ids[:prompt_len], output_len, req.source)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    num_requests: int
    seed: int = 0
    caps: LengthCaps = field(default_factory=LengthCaps)
    paper_filter: bool = True                  # the ShareGPT pruning rule (chatbot, code)

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; choose one of {list(WORKLOADS)}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    requests: tuple[Request, ...]
    pool_info: dict[str, Any]
    num_eligible: int                          # pool requests left after the filter and caps

    def arrivals(self, rate: float, cv: float = 1.0, seed: int | None = None) -> list[float]:
        return arrival_times(len(self.requests), rate, cv,
                             self.spec.seed if seed is None else seed)

    def describe(self) -> dict[str, Any]:
        """What a result file records about the workload (no token ids)."""
        return {"name": self.spec.name, "num_requests": self.spec.num_requests,
                "seed": self.spec.seed, "caps": asdict(self.spec.caps),
                "paper_filter": self.spec.paper_filter, "num_eligible": self.num_eligible,
                "pool": self.pool_info, "lengths": length_stats(self.requests)}


def arrival_times(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> list[float]:
    """n arrival times (s) starting at 0: Poisson at `rate` for cv=1, else gamma gaps with that
    coefficient of variation (cv > 1 is burstier). The same seed scales with the rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if cv <= 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    rng = np.random.default_rng([seed, 1])
    shape = 1.0 / cv ** 2
    gaps = rng.gamma(shape, 1.0 / shape, size=max(n - 1, 0)) / rate     # mean 1 / rate
    return [0.0] + np.cumsum(gaps).tolist()


def load_workload(spec: WorkloadSpec, tokenizer: str | Path = DEFAULT_TOKENIZER,
                  root: Path | None = None) -> Workload:
    """Sample spec.num_requests requests from the data set's pool (seeded)."""
    pool = load_pool(spec.name, tokenizer, root)
    eligible = [r for r in pool.requests if r.prompt_len > 0 and r.output_len > 0   # sendable
                and (not spec.paper_filter or passes_paper_filter(spec.name, r))]
    eligible = [c for c in (spec.caps.apply(r) for r in eligible) if c is not None]
    if not eligible:
        raise ValueError(f"no {spec.name} request is left after the filter and caps {spec.caps}")
    rng = np.random.default_rng([spec.seed, 0])
    replace = spec.num_requests > len(eligible)
    picks = rng.choice(len(eligible), size=spec.num_requests, replace=replace)
    return Workload(spec, tuple(eligible[i] for i in picks), pool.info, len(eligible))


def passes_paper_filter(name: str, req: Request) -> bool:
    """The DistServe artifact's pruning: ShareGPT drops requests whose prompt and output are
    both under 4 tokens, and prompt + output >= 2048; HumanEval the latter only. The
    summarization proxy has its own 1900-2048-token prompt window instead."""
    total_ok = req.prompt_len + req.output_len < MAX_TOTAL_TOKENS
    if name == "summarization":
        return True
    if name == "code":
        return total_ok
    return total_ok and not (req.prompt_len < MIN_TOKENS and req.output_len < MIN_TOKENS)


def length_stats(requests: Sequence[Request]) -> dict[str, dict[str, float]]:
    stats = {}
    for key, values in (("prompt", [r.prompt_len for r in requests]),
                        ("output", [r.output_len for r in requests])):
        a = np.asarray(values, dtype=float)
        stats[key] = {"mean": float(a.mean()), "min": float(a.min()), "p50": float(np.median(a)),
                      "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
                      "max": float(a.max())} if a.size else {}
    return stats
