"""The orchestrator's placement: live instances only, least loaded, bursts spread, the router
deciding in adaptive mode."""
from __future__ import annotations

import pytest

from backends.core.router import InstanceState
from backends.orchestrator.dispatch import Dispatcher, NoInstance, SLOs
from tests.test_router import Linear            # the router tests' hand-made latency model


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def prefill(i: int, queued: int = 0) -> InstanceState:
    return InstanceState(f"prefill-{i}", "prefill", 1000, queued_tokens=queued,
                         queued_requests=queued // 100)


def decode(i: int, running: int = 0, local: bool = False, free: int = 1000) -> InstanceState:
    return InstanceState(f"decode-{i}", "decode", free, num_running=running,
                         running_context=200 * running, local_prefill=local,
                         max_num_batched_tokens=256)


def make(states: dict, down=(), **kw) -> Dispatcher:
    published = {k: (v, 0.0) for k, v in states.items()}
    return Dispatcher([k for k in states if k.startswith("prefill")],
                      [k for k in states if k.startswith("decode")],
                      published.get, lambda i: i not in down, clock=Clock(), **kw)


def test_split_goes_to_the_least_loaded_live_instances():
    d = make({"prefill-0": prefill(0, 900), "prefill-1": prefill(1, 100), "prefill-2": prefill(2, 0),
              "decode-0": decode(0, 5), "decode-1": decode(1, 1)}, down={"prefill-2"})
    p = d.place(50, 10)
    assert (p.kind, p.prefill, p.decode) == ("split", "prefill-1", "decode-1")


def test_a_burst_spreads_over_equally_idle_instances():
    d = make({"prefill-0": prefill(0), "prefill-1": prefill(1),
              "decode-0": decode(0), "decode-1": decode(1)})
    first, second = d.place(500, 10), d.place(500, 10)
    assert {first.prefill, second.prefill} == {"prefill-0", "prefill-1"}
    assert {first.decode, second.decode} == {"decode-0", "decode-1"}


def test_placements_are_forgotten_once_a_newer_state_includes_them():
    states = {"prefill-0": (prefill(0), 0.0), "prefill-1": (prefill(1), 0.0),
              "decode-0": (decode(0), 0.0)}
    d = Dispatcher(["prefill-0", "prefill-1"], ["decode-0"], states.get, lambda i: True, clock=Clock())
    assert d.place(500, 10).prefill == "prefill-0"
    states["prefill-0"] = (prefill(0, 0), 11.0)   # written after: the request went through already
    assert d.place(500, 10).prefill == "prefill-0"


def test_no_live_instance_of_a_phase_is_refused():
    states = {"prefill-0": prefill(0), "decode-0": decode(0)}
    with pytest.raises(NoInstance, match="no prefill instance is up"):
        make(states, down={"prefill-0"}).place(10, 10)
    with pytest.raises(NoInstance, match="no decode instance is up"):
        make(states, down={"decode-0"}).place(10, 10)


def test_adaptive_prefills_a_short_prompt_locally_when_prefill_is_backed_up():
    states = {"prefill-0": prefill(0, 20_000), "decode-0": decode(0, 2, local=True)}
    d = make(states, mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear())
    p = d.place(64, 16)
    assert (p.kind, p.prefill, p.decode) == ("local", None, "decode-0")
    assert p.decision["kind"] == "local" and len(p.decision["options"]) == 2 and p.decision["reason"]
    # the same state, but no latency model: plain split
    assert make(states, mode="adaptive").place(64, 16).kind == "split"
    # a long prompt goes to prefill even so
    d2 = make({"prefill-0": prefill(0, 0), "decode-0": decode(0, 2, local=True)}, mode="adaptive",
              slo=SLOs(1.0, 0.1), predictor=Linear())
    assert d2.place(4000, 16).kind == "split"


def test_a_request_s_own_slo_is_the_one_the_router_judges():
    """The same state and prompt under the deployment's SLOs and under a request's own: a
    tighter TPOT shrinks the local option's chunks (so its TTFT grows), and a TTFT no option
    can reach is reported as missed rather than met."""
    states = {"prefill-0": prefill(0, 1500), "decode-0": decode(0, 2, local=True)}

    def place(**slo):
        d = make(states, mode="adaptive", slo=SLOs(100.0, 0.1), predictor=Linear())
        return d.place(64, 16, d.slos(**slo) if slo else None)
    default, tight_tpot, tight_ttft = place(), place(tpot=0.019), place(ttft=0.001)
    assert default.kind == "local" and default.decision["reason"] == "meets both SLOs, lowest TTFT"
    local, tighter = default.decision["options"][1], tight_tpot.decision["options"][1]
    assert tighter["chunk_budget"] < local["chunk_budget"] and tighter["ttft_s"] > local["ttft_s"]
    assert tighter["tpot_s"] <= 0.019 < local["tpot_s"]
    assert tight_ttft.decision["reason"].startswith("no option meets both SLOs")
    assert all("misses TTFT" in o["reason"] for o in tight_ttft.decision["options"])
    assert make(states).slos(tpot=0.05) == SLOs(4.0, 0.05)      # the rest: the deployment's


def test_adaptive_with_prefill_down_still_serves_locally_if_it_can():
    states = {"prefill-0": prefill(0), "decode-0": decode(0, 0, local=True)}
    d = make(states, down={"prefill-0"}, mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear())
    assert d.place(64, 16).kind == "local"
    with pytest.raises(NoInstance, match="no prefill instance is up"):
        make({"prefill-0": prefill(0), "decode-0": decode(0)}, down={"prefill-0"}, mode="adaptive",
             slo=SLOs(1.0, 0.1), predictor=Linear()).place(64, 16)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        make({"prefill-0": prefill(0), "decode-0": decode(0)}, mode="colocated")


def test_the_deployment_predictor_comes_from_this_hosts_profile(tmp_path):
    import dataclasses
    from deploy.deployment import default_deployment
    from planner.router_latency import deployment_predictor
    d = default_deployment(num_cores=2)
    p = deployment_predictor(d, "docs/profile_cpu.json")
    assert 0 < p.prefill_time([100]) < p.prefill_time([500])
    assert p.decode_step_time(1, 100) < p.mixed_step_time(1, 100, 64)
    with pytest.raises(ValueError, match="profiles smollm2.* serves other-model"):
        deployment_predictor(dataclasses.replace(d, model_path="models/other-model.gguf"),
                             "docs/profile_cpu.json")


def test_a_profile_of_another_cpu_gives_way_to_one_of_this_cpu(tmp_path, monkeypatch, caplog):
    import json
    import planner.profile
    from planner.router_latency import HOST_PROFILE, profile_for_host, profiled_cpu
    doc = json.loads(open("docs/profile_cpu.json").read())
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(doc))
    measured = profiled_cpu(shipped)
    assert measured and profiled_cpu(tmp_path / "none.json") is None
    monkeypatch.setattr(planner.profile, "cpu_model", lambda: measured)
    assert profile_for_host(shipped, tmp_path) == shipped                  # measured here
    monkeypatch.setattr(planner.profile, "cpu_model", lambda: "Other CPU")
    with caplog.at_level("WARNING"):
        assert profile_for_host(shipped, tmp_path) == shipped              # none of this CPU: kept,
    assert "measured on " + measured in caplog.text                         # with a warning
    host = tmp_path / HOST_PROFILE
    host.parent.mkdir(parents=True)
    doc["profile"]["machine"]["cpu_model"] = "Another CPU"
    host.write_text(json.dumps(doc))
    assert profile_for_host(shipped, tmp_path) == shipped                  # a third CPU's: no use
    doc["profile"]["machine"]["cpu_model"] = "Other CPU"
    host.write_text(json.dumps(doc))
    assert profile_for_host(shipped, tmp_path) == host                     # this CPU's


def test_an_int8_kv_deployment_takes_this_cpus_int8_profile(tmp_path, monkeypatch, caplog):
    """A decode step's attention costs less over int8 KV, so a deployment with int8 KV prices its
    steps with a profile measured with it (`./build.sh profile-host int8`) where this CPU has one;
    else with this CPU's bf16 one, and a warning."""
    import json
    import planner.profile
    from planner.router_latency import HOST_PROFILE, host_profile, profile_for_host
    doc = json.loads(open("docs/profile_cpu.json").read())
    doc["profile"]["machine"]["cpu_model"] = "This CPU"
    monkeypatch.setattr(planner.profile, "cpu_model", lambda: "This CPU")
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(doc))
    assert doc["profile"]["kv_dtype"] == "bfloat16" and host_profile("auto") == HOST_PROFILE
    assert profile_for_host(shipped, tmp_path, kv_dtype="bfloat16") == shipped
    with caplog.at_level("WARNING"):
        assert profile_for_host(shipped, tmp_path, kv_dtype="int8") == shipped     # none with int8
    assert "measured with bfloat16 KV, the deployment's is int8" in caplog.text
    own = tmp_path / host_profile("int8")
    own.parent.mkdir(parents=True)
    own.write_text(json.dumps({**doc, "profile": {**doc["profile"], "kv_dtype": "int8"}}))
    assert profile_for_host(shipped, tmp_path, kv_dtype="int8") == own
    assert profile_for_host(shipped, tmp_path) == shipped                         # bf16: unchanged


def test_where_prefill_shares_decode_cores_local_placements_come_first(tmp_path):
    """An idle prefill instance predicts the lowest TTFT (no decode marginal cost), so the
    router splits; with a decode instance on the prefill instance's cores (adaptive-shared)
    that split would time-slice those cores with decoding, so a local option meeting both SLOs
    is taken first, and a prompt no local option can serve in time still splits."""
    from deploy.deployment import default_deployment
    from backends.orchestrator.dispatch import adaptive_dispatcher
    from planner.deployment import serving, with_decode_on_prefill_cores
    states = {"prefill-0": prefill(0), "decode-0": decode(0, 2, local=True),
              "decode-1": decode(1, 0, local=True)}
    kw = dict(mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear())
    assert make(states, **kw).place(300, 16).kind == "split"
    p = make(states, prefer_local=True, **kw).place(300, 16)
    assert (p.kind, p.decode) == ("local", "decode-1")
    assert p.decision["reason"] == "meets both SLOs, local preferred, lowest TTFT"
    assert make(states, prefer_local=True, **kw).place(20_000, 16).kind == "split"
    plain = serving(default_deployment(num_cores=2), "adaptive")
    live = lambda i: True                                               # noqa: E731
    assert not adaptive_dispatcher(plain, tmp_path, live).prefer_local
    assert adaptive_dispatcher(with_decode_on_prefill_cores(plain), tmp_path, live).prefer_local
    # prefix caching on (the default): the dispatcher guesses where prompts are cached
    import dataclasses
    assert adaptive_dispatcher(plain, tmp_path, live).affinity.capacity == {
        "prefill-0": plain.prefill.num_kv_blocks, "decode-0": plain.decode.num_kv_blocks}
    off = dataclasses.replace(plain, prefill=dataclasses.replace(plain.prefill, prefix_caching=False),
                              decode=dataclasses.replace(plain.decode, prefix_caching=False))
    assert adaptive_dispatcher(off, tmp_path, live).affinity is None


def test_a_prefill_state_counts_what_it_has_not_received_yet():
    # the page is newer than both placements (an idle instance writes one every 50 ms) but
    # says the instance had received only the first: the second is still on its way
    states = {"prefill-0": (prefill(0), 0.0, 0), "decode-0": (decode(0), 0.0)}
    clock = Clock()
    d = Dispatcher(["prefill-0"], ["decode-0"], states.get, lambda i: True, clock=clock,
                   mode="adaptive", slo=SLOs(10.0, 1.0), predictor=Linear())
    d.place(300, 10)
    d.place(200, 10)
    states["prefill-0"] = (prefill(0, 300), 11.0, 1)       # written after both, has the first
    state = d._adjusted(*states["prefill-0"])
    assert (state.queued_tokens, state.queued_requests) == (500, 4)   # 300 + 200 in transit
    states["prefill-0"] = (prefill(0, 500), 11.5, 2)       # both arrived: nothing added
    assert d._adjusted(*states["prefill-0"]).queued_tokens == 500
    # by time alone (no count on the page) a page written after a send drops it
    assert d._adjusted(prefill(0, 300), 11.0).queued_tokens == 300


def test_the_measured_lateness_of_predictions_goes_into_the_instances_state():
    """Split predictions that ran 0.3 s late move the next prompt, predicted the same, to the
    decode instance; the bias is the median of the recent errors (the prediction it was made
    with excluded), needs BIAS_MIN_SAMPLES of them and forgets those older than BIAS_HORIZON_S."""
    from backends.orchestrator.dispatch import BIAS_HORIZON_S, BIAS_MIN_SAMPLES
    states = {"prefill-0": prefill(0, 0), "decode-0": decode(0, 2, local=True)}
    d = make(states, mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear())
    first = d.place(1500, 16)              # split 0.16 s; local 6 steps of <= 254 tokens, 0.25 s
    assert first.kind == "split" and first.predicted_ttft_s == pytest.approx(0.16)
    for late in (0.3, 0.29, 5.0, 0.31)[:BIAS_MIN_SAMPLES - 1]:
        d.observe(first, first.predicted_ttft_s + late)
    assert d.ttft_bias("prefill-0", d.clock()) == 0.0           # too few to go by
    d.observe(first, first.predicted_ttft_s + 0.31)
    assert d.ttft_bias("prefill-0", d.clock()) == pytest.approx(0.305)   # the median: 5 s ignored
    d.recent.clear()                                # (the same published states as before)
    again = d.place(1500, 16)
    split = next(o for o in again.decision["options"] if o["kind"] == "split")
    assert split["ttft_bias_s"] == pytest.approx(0.305) and "measured bias" in split["reason"]
    assert again.kind == "local"
    # a local prediction's error is its decode instance's
    d.observe(again, again.predicted_ttft_s + 0.01)
    assert d.errors["decode-0"][-1][1] == pytest.approx(0.01)
    # a prompt placed where a bias applies: its prediction is kept without it, so the errors
    # recorded stay those of the model, not of the corrected prediction
    d.recent.clear()
    long = d.place(4000, 16)        # split: local needs 16 steps, more than FEW_LOCAL_STEPS
    chosen = next(o for o in long.decision["options"] if o["kind"] == "split")
    assert long.kind == "split" and chosen["ttft_bias_s"] == pytest.approx(0.305)
    assert long.predicted_ttft_s == pytest.approx(chosen["ttft_s"] - 0.305)
    d.observe(long, long.predicted_ttft_s + 0.3)
    assert d.errors["prefill-0"][-1][1] == pytest.approx(0.3)
    d.clock.now += BIAS_HORIZON_S + 1
    assert d.ttft_bias("prefill-0", d.clock()) == 0.0           # forgotten: predicted afresh


def test_observed_reports_the_first_chunk_of_a_request():
    import asyncio
    from types import SimpleNamespace
    from backends.orchestrator.dispatch import Placement, observed
    d = make({"prefill-0": prefill(0), "decode-0": decode(0)}, mode="adaptive")
    seen = []
    d.observe = lambda placement, ttft: seen.append((placement.kind, ttft))

    closed = []

    async def chunks(first_timing):
        try:
            d.clock.now += 0.25
            yield SimpleNamespace(timing=first_timing)
            d.clock.now += 1.0
            yield SimpleNamespace(timing=SimpleNamespace(first_token_at=99.0))
        finally:
            closed.append(True)

    async def drain(it, n=None):
        out = []
        async for c in it:
            out.append(c)
            if len(out) == n:
                break
        await it.aclose()
        return out
    split, local = Placement("split", "decode-0", "prefill-0"), Placement("local", "decode-0")
    streamed = asyncio.run(drain(observed(chunks(None), d, split)))
    t0 = d.clock.now                                # a request's only chunk: at its first token
    whole = asyncio.run(drain(observed(chunks(SimpleNamespace(first_token_at=t0 + 0.2)), d, local)))
    bare = asyncio.run(drain(observed(chunks(SimpleNamespace(first_token_at=None)), d, local)))
    assert len(streamed) == len(whole) == len(bare) == 2
    assert seen == [("split", pytest.approx(0.25)), ("local", pytest.approx(0.2))]   # the first chunk
    # closing the wrapper after its first chunk closes the request's own stream (its cancel)
    closed.clear()
    assert len(asyncio.run(drain(observed(chunks(None), d, split), n=1))) == 1 and closed == [True]
    # the bookkeeping never fails a request
    d.observe = lambda placement, ttft: 1 / 0
    assert len(asyncio.run(drain(observed(chunks(None), d, split)))) == 2
