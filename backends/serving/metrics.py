"""Prometheus metrics on Triton's metrics port, through pb_utils.MetricFamily (injected).

Engine instances publish gauges from their worker's stats after every step; the orchestrator
observes TTFT/TPOT per request. Names are prefixed `distserve_`.
"""
from __future__ import annotations

from typing import Any

from deploy.contract import Timing

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class EngineMetrics:
    """Per-instance gauges (and KV transfer counters on decode)."""

    GAUGES = {
        "queue_depth": "Requests waiting for prefill (prefill) or for KV admission (decode: pending)",
        "running": "Sequences in the decode running batch",
        "last_batch_size": "Sequences in the most recent engine step",
        "kv_blocks_used": "KV cache blocks in use",
        "kv_blocks_total": "KV cache blocks in the pool",
        "leases": "Prefill KV block sets lent to decode and not yet released",
    }

    def __init__(self, pb: Any, phase: str, instance_id: str) -> None:
        labels = {"phase": phase, "instance": instance_id}
        self._gauges = {}
        for key, text in self.GAUGES.items():
            family = pb.MetricFamily(name=f"distserve_{key}", description=text,
                                     kind=pb.MetricFamily.GAUGE)
            self._gauges[key] = (family, family.Metric(labels=labels))
        self._counters = {}
        for key, text in (("kv_transfer_bytes", "Bytes of KV copied in from prefill instances"),
                          ("kv_transfer_seconds", "Seconds spent copying KV in")):
            family = pb.MetricFamily(name=f"distserve_{key}_total", description=text,
                                     kind=pb.MetricFamily.COUNTER)
            self._counters[key] = (family, family.Metric(labels=labels), [0.0])

    def update(self, stats: dict[str, Any]) -> None:
        stats = dict(stats)
        stats.setdefault("queue_depth", stats.get("pending", 0))
        for key, (_, metric) in self._gauges.items():
            if key in stats:
                metric.set(float(stats[key]))
        for key, (_, metric, last) in self._counters.items():
            if key in stats and stats[key] > last[0]:
                metric.increment(float(stats[key] - last[0]))
                last[0] = float(stats[key])


class RequestMetrics:
    """Histograms of what users see: TTFT, TPOT, end-to-end latency."""

    def __init__(self, pb: Any, model: str = "distserve") -> None:
        self._hist = {}
        for key, text in (("ttft_seconds", "Time to first token"),
                          ("tpot_seconds", "Time per output token after the first"),
                          ("e2e_seconds", "Request latency, end to end")):
            family = pb.MetricFamily(name=f"distserve_{key}", description=text,
                                     kind=pb.MetricFamily.HISTOGRAM)
            self._hist[key] = (family, family.Metric(labels={"model": model},
                                                     buckets=LATENCY_BUCKETS))

    def observe(self, timing: Timing | None) -> None:
        if timing is None:
            return
        for key, value in (("ttft_seconds", timing.ttft_s), ("tpot_seconds", timing.tpot_s),
                           ("e2e_seconds", timing.e2e_s)):
            if value is not None:
                self._hist[key][1].observe(float(value))
