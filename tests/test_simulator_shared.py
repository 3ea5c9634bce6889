"""A decode instance on a prefill instance's cores in the simulator (SimConfig.num_shared_decode):
the two time-slice the cores (processor sharing), the router prefers local there as the
dispatcher does, deployments with such an instance are simulated as one, and the planner
offers it as the mode adaptive-shared."""
from __future__ import annotations

import json

import pytest

from deploy.deployment import default_deployment
from planner.deployment import (_shared_decode, deployment_configs, load_deployment, load_target, serving,
                                to_deployment, with_decode_on_prefill_cores)
from planner.modes import can_share, parse_modes
from planner.rate_search import SLO
from planner.simulator import SimConfig, Simulator, make_requests
from tests.test_planner_modes import plan
from tests.test_simulator_adaptive import CPU_PROFILE, chatbot_like, search, split_config

TIGHT_TPOT = SLO(1.586, 0.050)          # docs/goodput/adaptive-slack's absolute SLOs


def test_shared_cores_split_time_between_the_steps_in_flight():
    """Two steps on one core: each runs at half speed while both are in flight; the work done
    is conserved (1 s + 1 s of work started at 0 and 0.5 end at 1.5 and 2.0)."""
    sim = Simulator(split_config().shared(), [])
    pre, dec = sim.prefills[0], sim.decodes[1]
    assert pre.cores is dec.cores is not None and sim.decodes[0].cores is None
    ended = []
    sim._step_done = lambda e, batch: ended.append((e, batch, sim.now))
    pre.cores.start(sim, pre, 1.0, "prefill-batch")
    sim._at(0.5, lambda: dec.cores.start(sim, dec, 1.0, "decode-batch"))
    while sim._events:
        sim.now, _, fn, args = __import__("heapq").heappop(sim._events)
        fn(*args)
    assert [(e, b) for e, b, _ in ended] == [(pre, "prefill-batch"), (dec, "decode-batch")]
    assert [t for *_, t in ended] == pytest.approx([1.5, 2.0])


def test_a_lone_request_on_shared_cores_runs_as_fast_as_on_its_own():
    """Nothing else in flight: a shared core is a whole core (the same TTFT and finish)."""
    reqs = make_requests([(300, 20)], [0.0])
    alone = Simulator(split_config(), reqs).run().records[0]
    shared = Simulator(split_config().shared(), reqs).run().records[0]
    assert (shared.first_token, shared.finish) == pytest.approx((alone.first_token, alone.finish))


def test_config_rules():
    cfg = split_config()
    assert cfg.shared().num_decode_instances == 2 and cfg.shared().adaptive(TIGHT_TPOT).num_shared_decode == 1
    with pytest.raises(ValueError, match="num_shared_decode"):
        SimConfig("disaggregated", cfg.prefill, cfg.decode, num_shared_decode=2)   # 1 prefill
    with pytest.raises(ValueError, match="num_shared_decode"):
        SimConfig("colocated", prefill=cfg.prefill, num_shared_decode=1)


def test_the_router_prefers_local_on_shared_cores_and_it_pays_where_tpot_binds():
    """Chatbot at tight TPOT (as measured: adaptive-shared 0.632 rps against adaptive 0.422 in
    docs/goodput/adaptive-slack): the second decode instance carries half the decoding, so
    the simulated goodput is higher too; and the router took local first there."""
    lengths = chatbot_like(1000)
    adaptive = split_config().adaptive(TIGHT_TPOT)
    shared = split_config().shared().adaptive(TIGHT_TPOT)
    g_adaptive, g_shared = search(adaptive, lengths, TIGHT_TPOT), search(shared, lengths, TIGHT_TPOT)
    assert g_shared > 1.2 * g_adaptive
    reqs = make_requests(lengths[:200], [i / g_shared for i in range(200)])
    sim = Simulator(shared, reqs)
    assert sim.routing.prefer_local and not Simulator(adaptive, reqs).routing.prefer_local
    records = sim.run().records
    assert sum(r.route == "local" for r in records) > len(records) / 2


def test_a_deployment_with_decode_on_prefill_cores_is_simulated_with_its_shared_core():
    target = load_target(CPU_PROFILE)
    dep = default_deployment("models/x.gguf", 2)
    plain = deployment_configs(dep, target)["disaggregated"]
    shared = deployment_configs(with_decode_on_prefill_cores(dep), target, "adaptive")["disaggregated"]
    assert (plain.num_decode, plain.num_shared_decode) == (1, 0)
    assert (shared.num_decode, shared.num_shared_decode, shared.mode) == (1, 1, "adaptive")
    import dataclasses
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = dataclasses.replace(dep, prefill=dataclasses.replace(dep.prefill, devices=((0, 1),)),
                                      decode=dataclasses.replace(dep.decode, devices=((1,),)))
    with pytest.raises(ValueError, match="cannot be simulated"):
        _shared_decode(partial)


def test_the_planner_offers_adaptive_shared_and_writes_its_deployment(tmp_path, capsys):
    assert parse_modes("split,adaptive-shared") == ("split", "adaptive-shared")
    lengths = chatbot_like(300)
    doc, path = plan(tmp_path, lengths, "--ttft", str(TIGHT_TPOT.ttft), "--tpot", str(TIGHT_TPOT.tpot),
                     "--modes", "split,adaptive,adaptive-shared")
    by_label = {p["served_as"]: p["per_device"] for p in doc["modes"]}
    assert set(by_label) == {"split", "adaptive", "adaptive-shared"}
    assert doc["served_as"] == max(by_label, key=by_label.get) == "adaptive-shared"
    dep, mode = load_deployment(path, check_host=False)
    assert mode == "adaptive" and doc["mode"] == "adaptive"
    assert dep.prefill.devices == ((0,),) and dep.decode.devices == ((1,), (0,))
    assert json.loads(open(path).read())["decode"]["num_instances"] == 2
    assert "adaptive-shared" in capsys.readouterr().out
    chosen = next(p for p in doc["modes"] if p["served_as"] == "adaptive-shared")
    assert chosen["num_devices"] == 2                   # the shared core is not counted twice


def test_to_deployment_round_trip_and_eligibility():
    from planner.search import Placement, PhaseChoice
    p = Placement("high", PhaseChoice(1, 1, 1.0), PhaseChoice(1, 1, 1.0), 1, 1, 1, 1.0, 2,
                  mode="adaptive", shared_cores=True)
    assert can_share(p) and p.label == "adaptive-shared"
    dep = serving(to_deployment(p), "adaptive")
    assert dep.decode.devices == ((1,), (0,))
    assert not can_share(Placement("high", PhaseChoice(2, 1, 1.0), PhaseChoice(1, 1, 1.0), 1, 1, 1, 1.0, 3))
    with pytest.raises(ValueError, match="served adaptive"):
        Placement("high", PhaseChoice(1, 1, 1.0), PhaseChoice(1, 1, 1.0), 1, 1, 1, 1.0, 2, shared_cores=True)
