"""Real mixed (chunked) step times against the planner's latency model, on one pinned core.

    python -m benchmarks.mixed_step [--core 1] [--out docs/mixed_step.json]

A decode-role engine (the default model, bf16 activations, the decode instance's weights) runs
k decoding sequences (300-token contexts, their KV not computed: the cost does not depend on
it) plus one prompt chunk of N tokens as one step (token budget k + N), for k in 0..16 and N in
0..512. Each cell: median of 4 timed steps (after one untimed). Beside it, what the simulator
charges for that step (`planner.simulator._Engine.step_time`: the chunk's prefill time plus the
decodes' marginal cost) from `docs/profile_cpu.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

DECODES = (0, 1, 4, 8, 16)
CHUNKS = (0, 16, 64, 128, 256, 512)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--profile", default="docs/profile_cpu.json")
    p.add_argument("--out", default="results/mixed_step.json")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.core})
    import torch
    torch.set_num_threads(1)
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.sampling import SamplingParams
    from backends.core.scheduler import Batch
    from backends.core.weights import load_checkpoint
    from planner.latency import load_profile
    from planner.simulator import InstanceSpec, Stage as _Stage, _Engine
    from backends.core.kv_cache import BlockManager

    load_before = os.getloadavg()
    from planner.profile import model_name
    lat = load_profile(args.profile).get(model_name(args.model), "cpu-core", 1)
    cfg, sd = load_checkpoint(args.model, torch.bfloat16, keep_quantized=True)
    limits = EngineLimits(2048, 64, 4096, 16, chunked_prefill=True)
    eng = LLMEngine(cfg, sd, EngineConfig(dtype="bfloat16", weights="auto", role="decode", limits=limits))
    sim = _Engine("decode", 0, InstanceSpec(lat, limits), _Stage(1), BlockManager(limits.num_kv_blocks))
    rng = np.random.default_rng(0)
    counter = iter(range(10 ** 9))
    rows = []
    for k in DECODES:
        for chunk in CHUNKS:
            if not k and not chunk:
                continue
            times, model = [], None
            for rep in range(5):
                reqs = []
                params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, seed=0)
                for _ in range(k):
                    rid = f"d{next(counter)}"
                    eng.add_prefilled(rid, rng.integers(0, cfg.vocab_size, 300).tolist(), 0, params)
                    reqs.append(rid)
                for seq in eng.admit_remote():
                    eng.kv_arrived(seq.req_id)
                if k:
                    eng.step()                                  # the first token of each: settled
                if chunk:
                    rid = f"p{next(counter)}"
                    eng.add_request(rid, rng.integers(0, cfg.vocab_size, chunk).tolist(),
                                    SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
                    reqs.append(rid)
                t0 = time.perf_counter()
                eng.step(token_budget=k + chunk)
                elapsed = time.perf_counter() - t0
                batch: Batch = eng.last_batch
                if batch.num_decodes != k or sum(batch.num_new[k:]) != chunk:
                    raise RuntimeError(f"step ran {batch.num_decodes} decodes and {batch.num_new[k:]}, "
                                       f"not {k} and [{chunk}]")
                model = sim.step_time(batch)
                if rep:
                    times.append(elapsed)
                for rid in reqs:
                    eng.abort(rid)
            real = statistics.median(times)
            rows.append({"decodes": k, "chunk": chunk, "real_ms": 1e3 * real, "model_ms": 1e3 * model,
                         "ratio": real / model})
            print(f"decodes {k:2d} chunk {chunk:3d}: real {1e3 * real:6.1f} ms, model "
                  f"{1e3 * model:6.1f} ms, real/model {real / model:.2f}", flush=True)
    doc = {"command": "python -m benchmarks.mixed_step " + " ".join(argv or []), "core": args.core,
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
