"""Prometheus metrics on Triton's metrics port, through pb_utils.MetricFamily (injected).

Engine instances publish gauges from their worker's stats after every step; the orchestrator
observes TTFT/TPOT per request. Names are prefixed `distserve_`.

Each class has close(), which the model's finalize() calls (release_at_finalize): it drops
the metrics and their families while the stub can still tell the server. After close() the
methods do nothing.
"""
from __future__ import annotations

import gc
from typing import Any

from deploy.contract import Timing

IN_FLIGHT_METRIC = "distserve_requests_in_flight"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class EngineMetrics:
    """Per-instance gauges, and counters (KV copied in on decode; prefix cache lookups)."""

    GAUGES = {
        "queue_depth": "Requests waiting for prefill (prefill) or for KV admission (decode: pending)",
        "running": "Sequences in the decode running batch",
        "last_batch_size": "Sequences in the most recent engine step",
        "kv_blocks_used": "KV cache blocks in use",
        "kv_blocks_cached": "KV cache blocks free but holding cached prefixes (evictable)",
        "kv_blocks_total": "KV cache blocks in the pool",
        "leases": "Prefill KV block sets lent to decode and not yet released",
    }

    def __init__(self, pb: Any, phase: str, instance_id: str) -> None:
        labels = {"phase": phase, "instance": instance_id}
        self._gauges = {}
        for key, text in self.GAUGES.items():
            family = pb.MetricFamily(name=f"distserve_{key}", description=text,
                                     kind=pb.MetricFamily.GAUGE)
            self._gauges[key] = (family, family.Metric(labels=labels), [None])
        self._counters = {}
        for key, text in (("kv_transfer_bytes", "Bytes of KV copied in from prefill instances"),
                          ("kv_transfer_seconds", "Seconds spent copying KV in"),
                          ("prefix_query_tokens", "Prompt tokens looked up in the prefix cache"),
                          ("prefix_hit_tokens", "Prompt tokens whose KV the prefix cache held")):
            family = pb.MetricFamily(name=f"distserve_{key}_total", description=text,
                                     kind=pb.MetricFamily.COUNTER)
            self._counters[key] = (family, family.Metric(labels=labels), [0.0])

    def close(self) -> None:
        self._gauges, self._counters = {}, {}

    def update(self, stats: dict[str, Any]) -> None:
        """Set what changed since the last update. Each set is an IPC round trip to the server
        under the stub's shared-memory mutex, so an idle instance makes none (a stub killed
        while it holds that mutex aborts tritonserver itself: docs/faults.md)."""
        stats = dict(stats)
        stats.setdefault("queue_depth", stats.get("pending", 0))
        for key, (_, metric, last) in self._gauges.items():
            if key in stats and float(stats[key]) != last[0]:
                last[0] = float(stats[key])
                metric.set(last[0])
        for key, (_, metric, last) in self._counters.items():
            if key in stats and stats[key] > last[0]:
                metric.increment(float(stats[key] - last[0]))
                last[0] = float(stats[key])


class RequestMetrics:
    """Histograms of what users see (TTFT, TPOT, end-to-end latency), and the requests in flight
    on this front end (`distserve_requests_in_flight`). The server keeps a gauge's last value
    after the stub that set it dies, which the launcher reads to choose how to recover
    (deploy/server.py)."""

    def __init__(self, pb: Any, model: str = "distserve") -> None:
        self._in_flight_family = pb.MetricFamily(
            name=IN_FLIGHT_METRIC, kind=pb.MetricFamily.GAUGE,
            description="Requests this front end is answering (accepted, final response not sent)")
        self._in_flight = self._in_flight_family.Metric(labels={"model": model})
        self._hist = {}
        for key, text in (("ttft_seconds", "Time to first token"),
                          ("tpot_seconds", "Time per output token after the first"),
                          ("e2e_seconds", "Request latency, end to end")):
            family = pb.MetricFamily(name=f"distserve_{key}", description=text,
                                     kind=pb.MetricFamily.HISTOGRAM)
            self._hist[key] = (family, family.Metric(labels={"model": model},
                                                     buckets=LATENCY_BUCKETS))

    def close(self) -> None:
        self._in_flight = self._in_flight_family = None
        self._hist = {}

    def in_flight(self, delta: int) -> None:
        metric = self._in_flight
        if metric is not None:
            metric.increment(float(delta))

    def observe(self, timing: Timing | None) -> None:
        hist = self._hist
        if timing is None or not hist:
            return
        for key, value in (("ttft_seconds", timing.ttft_s), ("tpot_seconds", timing.tpot_s),
                           ("e2e_seconds", timing.e2e_s)):
            if value is not None:
                hist[key][1].observe(float(value))


class HealthMetrics:
    """What the orchestrator's monitor sees, for probes and alerts: `distserve_instance_up`
    (1 up, 0 down or not yet up) per engine instance, and `distserve_ready` (1 while every
    phase has an instance up). Triton's own ready endpoints cannot say this: a python model
    cannot change its readiness, so they answer 200 while an instance is down."""

    def __init__(self, pb: Any, instance_ids: list[str], phase_of: Any,
                 model: str = "distserve") -> None:
        self.phase_of = phase_of
        up = pb.MetricFamily(name="distserve_instance_up", kind=pb.MetricFamily.GAUGE,
                             description="1 if the orchestrator counts the engine instance up")
        ready = pb.MetricFamily(name="distserve_ready", kind=pb.MetricFamily.GAUGE,
                                description="1 while every phase has an instance up")
        self._families = (up, ready)
        self._up = {i: up.Metric(labels={"instance": i, "phase": phase_of(i), "model": model})
                    for i in instance_ids}
        self._ready = ready.Metric(labels={"model": model})

    def close(self) -> None:
        self._up, self._ready, self._families = {}, None, ()

    def update(self, status: dict[str, str]) -> None:
        """`status`: InstanceMonitor.status() (instance -> "up" / "starting" / "dead" / "stuck")."""
        up, ready = self._up, self._ready
        if ready is None:
            return
        phases: dict[str, bool] = {}
        for instance, state in status.items():
            is_up = state == "up"
            if instance in up:
                up[instance].set(1.0 if is_up else 0.0)
            phase = self.phase_of(instance)
            phases[phase] = phases.get(phase, False) or is_up
        ready.set(1.0 if phases and all(phases.values()) else 0.0)


def release_at_finalize(model: Any, *metrics: EngineMetrics | RequestMetrics | HealthMetrics) -> None:
    """The end of a model's finalize(): delete every python-backend object it holds while the
    stub still works. Each `metrics` is closed; then the model's attributes are dropped (kept
    BLS streams, response senders, ...) and reference cycles collected. An object of Triton's
    left for the interpreter's exit is destroyed after the stub is gone, and its destructor's
    message through the stub segfaulted every stub as it unloaded ("Fatal Python error:
    Segmentation fault ... Garbage-collecting"; triton-inference-server/server#8662 for
    metrics; a BLS response iterator does the same). The model is unusable afterwards."""
    for m in metrics:
        m.close()
    vars(model).clear()
    gc.collect()
