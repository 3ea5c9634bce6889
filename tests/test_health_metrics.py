"""The orchestrator's health gauges (distserve_ready, distserve_instance_up), driven by the
instance monitor's probe rounds, with a fake probe (tests/test_health.py's Fleet) and a fake
pb_utils.MetricFamily."""
from __future__ import annotations

import threading

from backends.orchestrator.health import InstanceMonitor, phase_of
from tests.test_health import Fleet


class FakeMetrics:
    """pb_utils.MetricFamily's shape: families of labelled metrics that keep their value."""

    GAUGE = "gauge"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.metrics = name, []

    def Metric(self, labels: dict):                     # noqa: N802 - pb_utils' name
        m = type("M", (), {"labels": labels, "value": None})()
        m.set = lambda v, m=m: setattr(m, "value", v)
        self.metrics.append(m)
        return m


def test_health_gauges_follow_each_round_of_probes():
    """distserve_instance_up per instance and distserve_ready (every phase has one up), set by
    the monitor's thread after each round: 1 while up, 0 once its only decode instance dies."""
    from types import SimpleNamespace
    from backends.serving.metrics import HealthMetrics
    pb = SimpleNamespace(MetricFamily=FakeMetrics)
    ids = ["prefill-0", "decode-0", "decode-1"]
    health = HealthMetrics(pb, ids, phase_of)
    up_family, ready_family = health._families
    value = {m.labels["instance"]: m for m in up_family.metrics}
    rounds = threading.Semaphore(0)
    fleet = Fleet(*ids)
    monitor = InstanceMonitor(ids, fleet.probe, fleet.reload, interval_s=0.01,
                              on_round=lambda st: (health.update(st), rounds.release()))
    monitor.start()
    try:
        def after_a_round() -> None:
            for _ in range(2):                          # one whole round after the change
                assert rounds.acquire(timeout=5)
        after_a_round()
        assert [value[i].value for i in ids] == [1.0, 1.0, 1.0] and ready_family.metrics[0].value == 1.0
        fleet.state["decode-0"] = "dead"
        after_a_round()
        assert value["decode-0"].value == 0.0 and ready_family.metrics[0].value == 1.0   # decode-1 serves
        fleet.state["decode-1"] = "dead"
        after_a_round()
        assert ready_family.metrics[0].value == 0.0
    finally:
        monitor.stop()


def test_engine_gauges_are_set_only_when_they_change():
    """Each gauge set is an IPC round trip under the stub's mutex (a stub killed holding it
    aborts tritonserver): an idle instance's repeated updates set nothing; counters add deltas."""
    from types import SimpleNamespace
    from backends.serving.metrics import EngineMetrics
    sets: list[tuple[str, float]] = []

    class Family(FakeMetrics):
        COUNTER = "counter"

        def Metric(self, labels: dict):                 # noqa: N802 - pb_utils' name
            m = super().Metric(labels)
            m.set = lambda v, name=self.name: sets.append((name, v))
            m.increment = lambda v, name=self.name: sets.append((name, v))
            return m

    metrics = EngineMetrics(SimpleNamespace(MetricFamily=Family), "prefill", "prefill-0")
    stats = {"pending": 2, "running": 0, "kv_blocks_used": 5, "kv_transfer_bytes": 10}
    metrics.update(stats)
    first = dict(sets)
    assert first["distserve_queue_depth"] == 2.0 and first["distserve_kv_transfer_bytes_total"] == 10.0
    sets.clear()
    for _ in range(3):
        metrics.update(stats)                           # idle: nothing changed
    assert sets == []
    metrics.update({**stats, "kv_blocks_used": 7, "kv_transfer_bytes": 25})
    assert sorted(sets) == [("distserve_kv_blocks_used", 7.0), ("distserve_kv_transfer_bytes_total", 15.0)]


def test_close_deletes_every_metric_before_finalize_returns():
    """A pb_utils object left for the interpreter's exit is deleted after the stub is gone, and
    its destructor's IPC segfaulted every stub at unload (triton-inference-server/server#8662):
    release_at_finalize deletes every metric (families included) and whatever else the model
    held, cycles too, while the stub lives; later calls from a straggling thread do nothing."""
    import weakref
    from types import SimpleNamespace
    from backends.serving.metrics import EngineMetrics, HealthMetrics, RequestMetrics, release_at_finalize
    from deploy.contract import Timing

    class Family(FakeMetrics):
        COUNTER, HISTOGRAM = "counter", "histogram"
        made: list = []

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            Family.made.append(weakref.ref(self))

        def Metric(self, labels: dict, buckets=None):   # noqa: N802 - pb_utils' name
            m = super().Metric(labels)
            m.increment = m.observe = lambda v: None
            Family.made.append(weakref.ref(m))
            return m

    pb = SimpleNamespace(MetricFamily=Family)
    engine = EngineMetrics(pb, "decode", "decode-0")
    request = RequestMetrics(pb)
    health = HealthMetrics(pb, ["prefill-0", "decode-0"], phase_of)
    engine.update({"pending": 1, "running": 2})
    request.in_flight(+1)
    health.update({"prefill-0": "up", "decode-0": "up"})
    assert len(Family.made) > 20 and all(ref() is not None for ref in Family.made)
    class Held:                                          # e.g. a BLS stream bls_keep holds
        pass
    model = SimpleNamespace(metrics=engine, kept=[Held()])
    model.kept[0].cycle = model.kept                     # a cycle: only a collection frees it
    kept = weakref.ref(model.kept[0])
    release_at_finalize(model, engine, request, health)
    assert [ref for ref in Family.made if ref() is not None] == []
    assert kept() is None and vars(model) == {}          # what else the model held, gone too
    engine.update({"pending": 3})
    request.in_flight(-1)
    request.observe(Timing(ttft_s=0.1, tpot_s=0.01, e2e_s=1.0))
    health.update({"prefill-0": "dead"})
