"""Per-request latencies and SLO attainment.

Definitions (seconds, on the client's clock, relative to the start of a run):
- send: when the request was sent (its scheduled arrival plus any client lag).
- TTFT: send -> the first response that carries tokens.
- TPOT: (time of the last token-carrying response - time of the first) / (tokens - 1), where
  tokens counts token ids (not responses). None for a one-token output: it has no decode
  phase, so it meets any TPOT SLO.
- E2E: send -> the end of the stream.
A request fails if the server or the network reported an error, it timed out, or the stream
ended without a token. A failure misses every SLO; failures are recorded, never dropped.
A result's `server_timing` is a deploy.contract.Timing; in result JSON files it is that
Timing's dict (`to_json` / `from_json`), as the files have always held.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from deploy.contract import Timing


@dataclass(frozen=True)
class RequestResult:
    index: int                         # position in the workload
    prompt_len: int
    output_len: int                    # tokens asked for
    arrival_s: float                   # scheduled
    send_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    num_tokens: int = 0                # tokens received
    finish_reason: str | None = None
    error: str | None = None
    server_timing: Timing | None = None  # Triton: queueing, prefill, KV transfer, ...

    def __post_init__(self) -> None:
        if isinstance(self.server_timing, dict):           # a record read from JSON
            object.__setattr__(self, "server_timing", Timing.from_dict(self.server_timing))

    @property
    def ok(self) -> bool:
        return self.error is None and self.num_tokens > 0

    def to_json(self) -> dict[str, Any]:
        timing = self.server_timing
        return asdict(self) | {"server_timing": None if timing is None else timing.to_dict()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestResult:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


class Timeline:
    """Collects one request's events as they happen, then becomes a RequestResult."""

    def __init__(self, index: int, prompt_len: int, output_len: int, arrival_s: float) -> None:
        self.index, self.prompt_len, self.output_len = index, prompt_len, output_len
        self.arrival_s = arrival_s
        self.send_s: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.t_end: float | None = None
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.server_timing: Timing | None = None

    def sent(self, now: float) -> None:
        self.send_s = now

    def tokens(self, now: float, num_tokens: int) -> None:
        """A response with num_tokens new tokens arrived now (0: a response without tokens)."""
        if num_tokens <= 0:
            return
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.num_tokens += num_tokens

    def reported(self, num_tokens: int) -> None:
        """The server's own count of all output tokens (it replaces ours)."""
        self.num_tokens = num_tokens

    def finished(self, now: float, error: str | None = None) -> None:
        if self.t_end is None:
            self.t_end = now
        if error is not None and self.error is None:
            self.error = error

    def result(self) -> RequestResult:
        error = self.error
        if error is None and self.num_tokens == 0:
            error = "the stream ended without a token"
        sent = self.send_s
        return RequestResult(
            index=self.index, prompt_len=self.prompt_len, output_len=self.output_len,
            arrival_s=self.arrival_s, send_s=sent,
            ttft_s=None if self.t_first is None or sent is None else self.t_first - sent,
            tpot_s=tpot(self.t_first, self.t_last, self.num_tokens),
            e2e_s=None if self.t_end is None or sent is None else self.t_end - sent,
            num_tokens=self.num_tokens, finish_reason=self.finish_reason, error=error,
            server_timing=self.server_timing)


def tpot(t_first: float | None, t_last: float | None, num_tokens: int) -> float | None:
    if t_first is None or t_last is None or num_tokens < 2:
        return None
    return (t_last - t_first) / (num_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLOs must be > 0 s, got TTFT {self.ttft_s}, TPOT {self.tpot_s}")

    def scaled(self, scale: float) -> SLO:
        return replace(self, ttft_s=self.ttft_s * scale, tpot_s=self.tpot_s * scale)


def meets(r: RequestResult, slo: SLO) -> bool:
    """Both SLOs met (a failure never meets them)."""
    return (r.ok and r.ttft_s is not None and r.ttft_s <= slo.ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo.tpot_s))


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    """The fraction of all requests, failures included, that met both SLOs."""
    if not results:
        raise ValueError("attainment of no requests")
    return sum(meets(r, slo) for r in results) / len(results)


def slo_scale_sweep(results: Sequence[RequestResult], slo: SLO,
                    scales: Sequence[float]) -> list[float]:
    """Attainment as both SLOs are multiplied by each scale (the paper's "SLO scale" axis)."""
    return [attainment(results, slo.scaled(s)) for s in scales]


def summarize(results: Sequence[RequestResult], slo: SLO | None = None) -> dict[str, Any]:
    """Counts, latency percentiles, throughput and (with an SLO) each attainment."""
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {"num_requests": len(results), "num_ok": len(ok),
                           "num_failed": len(results) - len(ok)}
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        values = np.array([getattr(r, key) for r in ok if getattr(r, key) is not None], dtype=float)
        out[key] = ({"mean": float(values.mean()), "p50": float(np.median(values)),
                     "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
                     "max": float(values.max())} if values.size else None)
    lags = [r.send_s - r.arrival_s for r in results if r.send_s is not None]
    if lags:                                   # a busy client sends late: check this is small
        out["send_lag_s"] = {"p50": float(np.median(lags)), "max": float(max(lags))}
    sent = [r.send_s for r in results if r.send_s is not None]
    ends = [r.send_s + r.e2e_s for r in results if r.send_s is not None and r.e2e_s is not None]
    if sent and ends and max(ends) > min(sent):
        span = max(ends) - min(sent)
        out["duration_s"] = span
        out["throughput_rps"] = len(ok) / span
        out["output_tokens_per_s"] = sum(r.num_tokens for r in ok) / span
    if slo is not None and results:
        out["attainment"] = attainment(results, slo)
        out["ttft_attainment"] = sum(r.ok and r.ttft_s is not None and r.ttft_s <= slo.ttft_s
                                     for r in results) / len(results)
        out["tpot_attainment"] = sum(r.ok and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)
                                     for r in results) / len(results)
    timing = _mean_server_timing(ok)
    if timing:
        out["server_timing_mean"] = timing
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    if errors:
        out["errors"] = errors
    return out


def _mean_server_timing(results: Sequence[RequestResult]) -> dict[str, float]:
    """Mean of each numeric field of the server's timing breakdown (not its `*_at` clock
    readings), over the requests with one."""
    sums: dict[str, list[float]] = {}
    for r in results:
        timing = r.server_timing.to_dict() if r.server_timing is not None else {}
        for key, value in timing.items():
            if not key.endswith("_at") and isinstance(value, (int, float)):    # not `route`
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sorted(sums.items())}


BREAKDOWN_KEYS = ("ttft", "queue", "prefill", "ttft_other", "handoff", "transfer", "decode",
                  "e2e", "tpot")


def time_breakdown(results: Sequence[RequestResult]) -> dict[str, float]:
    """Where a completed request's time went, mean seconds over the requests the server timed:

    ttft = queue (waiting for the first step) + prefill (the step(s) computing the prompt)
    + ttft_other (orchestrator, Triton, network); then handoff (disaggregated: first token
    sent -> KV admitted on decode, which includes `transfer`, the KV copy alone) and decode
    (to the last token); e2e is the client's. Colocated requests have no hand-off.
    """
    rows = []
    for r in results:
        t = r.server_timing
        if not r.ok or t is None or r.ttft_s is None or r.e2e_s is None:
            continue
        handoff = 0.0
        if t.decode_admitted_at is not None and t.first_token_at is not None:
            handoff = max(0.0, t.decode_admitted_at - t.first_token_at)
        queue, prefill = t.prefill_queue_s or 0.0, t.prefill_s or 0.0
        rows.append({"ttft": r.ttft_s, "queue": queue, "prefill": prefill,
                     "ttft_other": r.ttft_s - queue - prefill, "handoff": handoff,
                     "transfer": t.kv_transfer_s or 0.0,
                     "decode": r.e2e_s - r.ttft_s - handoff, "e2e": r.e2e_s,
                     "tpot": r.tpot_s or 0.0})
    if not rows:
        return {}
    return {k: float(np.mean([row[k] for row in rows])) for k in BREAKDOWN_KEYS} | {"num_requests": len(rows)}


def route_counts(results: Sequence[RequestResult]) -> dict[str, int]:
    """How an adaptive deployment's router placed the requests the server timed ("split",
    "local", "wait"); empty for a system without a router."""
    out: dict[str, int] = {}
    for r in results:
        route = r.server_timing.route if r.server_timing is not None else None
        if route:
            kind = str(route.get("kind"))
            out[kind] = out.get(kind, 0) + 1
    return out
