"""Multi-turn chat replayed as users do it: closed loop, turn k+1 after turn k plus a think time.

    python -m client.bench.sessions --endpoint triton-grpc --url 127.0.0.1:8001 \\
        --users 1,2,4,8 --sessions 24 --slo-ttft 1.0 --slo-tpot 0.1 --out /tmp/sessions

Sessions are real ShareGPT conversations (client/bench/datasets.py), tokenized turn by turn
with the served model's tokenizer: turn k's prompt is every earlier message (human and gpt,
each followed by a newline token) plus the k-th human message, so each turn's prompt starts
with the previous turn's prompt token for token (what a prefix cache can reuse); its output
length is the token count of the k-th gpt reply (capped), asked for exactly (ignore_eos), as
the other workloads do. A session ends at its last exchange or before a prompt + output would
pass `max_total_tokens`.

`num_users` simulated users share the sessions (each takes the next unstarted one when its
session ends); a user sends turn k+1 when turn k has finished, after an exponential think time
(mean `think_s`, seeded). Unlike the open-loop replay (runner.py), the load follows the
server: a slower server gets fewer requests. Reported per user count: SLO attainment, the
throughput of requests that met both SLOs (goodput, requests/s), TTFT of first turns and of
later turns (later turns repeat a served prefix: a prefix cache shows here). The goodput of a
sweep is the best SLO-meeting throughput among the user counts whose attainment is >= 90%.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .metrics import SLO, RequestResult, meets
from .pools import DEFAULT_TOKENIZER, Request

TARGET_ATTAINMENT = 0.9


@dataclass(frozen=True)
class Turn:
    session: int
    turn: int                                   # 0 for the first
    request: Request


def build_sessions(records: Sequence[dict[str, Any]], tok: Any, num_sessions: int, *,
                   min_turns: int = 2, max_turns: int = 6, max_output_tokens: int = 128,
                   max_total_tokens: int = 2048, seed: int = 0) -> list[list[Turn]]:
    """`num_sessions` conversations with >= `min_turns` exchanges, in a seeded order."""
    newline = tok.encode("\n", add_special_tokens=False)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    sessions: list[list[Turn]] = []
    for i in order:
        if len(sessions) == num_sessions:
            break
        turns, history = [], []
        messages = records[i].get("conversations") or []
        for human, gpt in zip(messages[::2], messages[1::2]):
            if human.get("from") != "human" or gpt.get("from") != "gpt" or len(turns) == max_turns:
                break
            asked = tok.encode(human.get("value") or "", add_special_tokens=False) + newline
            reply = tok.encode(gpt.get("value") or "", add_special_tokens=False)
            prompt, out_len = history + asked, min(len(reply), max_output_tokens)
            if not reply or len(prompt) + out_len > max_total_tokens:
                break
            turns.append(Turn(len(sessions), len(turns),
                              Request(tuple(prompt), out_len, f"sharegpt:{records[i].get('id', i)}#{len(turns)}")))
            history = prompt + reply + newline
        if len(turns) >= min_turns:
            sessions.append(turns)
    if len(sessions) < num_sessions:
        raise ValueError(f"only {len(sessions)} conversations have >= {min_turns} usable turns")
    return sessions


async def replay_sessions(endpoint: Any, sessions: Sequence[Sequence[Turn]], num_users: int, *,
                          think_s: float = 1.0, timeout_s: float = 300.0, seed: int = 0
                          ) -> tuple[list[tuple[Turn, RequestResult]], float]:
    """Every turn of every session, closed loop; (turn, result) pairs and the run's seconds."""
    from .runner import run_one
    rng = random.Random(seed)
    queue = list(reversed(range(len(sessions))))
    results: list[tuple[Turn, RequestResult]] = []
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0                       # noqa: E731

    async def user() -> None:
        while queue:
            for turn in sessions[queue.pop()]:
                result = await run_one(endpoint, turn.request, len(results), now(), now, timeout_s)
                results.append((turn, result))
                if not result.ok:
                    break                               # a user whose turn failed gives up
                await asyncio.sleep(rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0)
    await asyncio.gather(*(user() for _ in range(num_users)))
    return results, now()


def summarize(results: Sequence[tuple[Turn, RequestResult]], seconds: float, slo: SLO) -> dict[str, Any]:
    done = [r for _, r in results]
    met = [r for r in done if meets(r, slo)]
    tpots = [r.tpot_s for r in done if r.ok and r.tpot_s is not None]

    def ttft(rs: list[RequestResult]) -> float | None:
        values = [r.ttft_s for r in rs if r.ok and r.ttft_s is not None]
        return statistics.median(values) if values else None
    return {"requests": len(done), "failed": sum(not r.ok for r in done),
            "attainment": len(met) / len(done) if done else 0.0,
            "goodput_rps": len(met) / seconds if seconds > 0 else 0.0,
            "throughput_rps": sum(r.ok for r in done) / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
            "ttft_first_turn_p50_s": ttft([r for t, r in results if t.turn == 0]),
            "ttft_later_turns_p50_s": ttft([r for t, r in results if t.turn > 0]),
            "mean_prompt_tokens": statistics.fmean(r.prompt_len for r in done) if done else 0.0,
            # which SLO the misses broke (a request can break both), and TPOT's spread
            "missed_ttft": sum(r.ok and r.ttft_s is not None and r.ttft_s > slo.ttft_s for r in done),
            "missed_tpot": sum(r.ok and r.tpot_s is not None and r.tpot_s > slo.tpot_s for r in done),
            "tpot_p50_s": _quantile(tpots, 0.5), "tpot_p90_s": _quantile(tpots, 0.9)}


def _quantile(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


def sweep_goodput(points: dict[int, dict[str, Any]]) -> float:
    """The best SLO-meeting throughput among the user counts that attain the target."""
    return max((p["goodput_rps"] for p in points.values() if p["attainment"] >= TARGET_ATTAINMENT),
               default=0.0)


def sweep_users(endpoint: str, url: str, model: str, sessions: Sequence[Sequence[Turn]],
                users: Sequence[int], slo: SLO, *, think_s: float = 1.0, seed: int = 0,
                log: Any = print, raw_dir: Path | None = None) -> dict[int, dict[str, Any]]:
    """Replay every session at each user count in turn; each count's summary (with `raw_dir`,
    every request's result too, as <raw_dir>/users-<n>.json.gz)."""
    from .endpoints import make_endpoint
    from .runner import run_sync
    points = {}
    for n in users:
        async def run() -> tuple[list, float]:
            async with make_endpoint(endpoint, url, model) as ep:
                return await replay_sessions(ep, sessions, n, think_s=think_s, seed=seed)
        results, seconds = run_sync(run())
        points[n] = summarize(results, seconds, slo)
        if raw_dir is not None:
            import gzip
            raw_dir.mkdir(parents=True, exist_ok=True)
            rows = [{"session": t.session, "turn": t.turn, **r.to_json()} for t, r in results]
            with gzip.open(raw_dir / f"users-{n}.json.gz", "wt") as f:
                json.dump(rows, f)
        log(f"{n} users: {json.dumps(points[n])}")
    return points


def main(argv: Sequence[str] | None = None) -> None:
    from backends.core.tokenizer import Tokenizer

    from . import datasets as ds
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default="triton-grpc", help="triton-grpc, triton-http or openai")
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="distserve")
    ap.add_argument("--users", default="1,2,4,8", help="comma-separated user counts to sweep")
    ap.add_argument("--sessions", type=int, default=24, help="sessions per user count")
    ap.add_argument("--think", type=float, default=1.0, help="mean think time between turns, s")
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--max-output-tokens", type=int, default=128)
    ap.add_argument("--slo-ttft", type=float, required=True, help="seconds")
    ap.add_argument("--slo-tpot", type=float, required=True, help="seconds")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what is served (goes into the result)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON path (.json added)")
    args = ap.parse_args(argv)
    records = ds.read_sharegpt(ds.dataset_path(ds.SHAREGPT_FILE)).conversations
    sessions = build_sessions(records, Tokenizer.load(args.tokenizer), args.sessions,
                              max_turns=args.max_turns, max_output_tokens=args.max_output_tokens,
                              seed=args.seed)
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    points = sweep_users(args.endpoint, args.url, args.model, sessions,
                         [int(u) for u in args.users.split(",")], slo, think_s=args.think,
                         seed=args.seed, log=lambda line: print(line, flush=True))
    out = {"label": args.label, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
           "sessions": args.sessions, "turns": sum(len(s) for s in sessions),
           "think_s": args.think, "points": points, "goodput_rps": sweep_goodput(points)}
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"goodput {out['goodput_rps']:.3f} rps -> {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
