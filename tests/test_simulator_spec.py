"""Speculative decoding in the planner's simulator (planner/sim_spec.py): drafts verified
through the scheduler's own calls, each request still ends at its output length, the yield per
verify row follows the acceptance, a step costs its verify rows, and the router sees the yield."""
from __future__ import annotations

from dataclasses import replace

import pytest

from backends.core.limits import EngineLimits
from backends.core.scheduler import Scheduler
from planner.rate_search import SLO
from planner.sim_spec import Speculation
from planner.simulator import InstanceSpec, SimConfig, simulate
from tests.test_simulator_adaptive import chatbot_like, cpu_latency, split_config


def test_speculation_is_validated_and_its_yield_is_the_geometric_sum():
    assert Speculation(3, 1.0).tokens_per_step == 4
    assert Speculation(3, 0.0).tokens_per_step == 1
    assert Speculation(2, 0.5).tokens_per_step == pytest.approx(1.75)
    for k, a in ((0, 0.5), (17, 0.5), (True, 0.5), (3, 1.5), (3, -0.1)):
        with pytest.raises(ValueError):
            Speculation(k, a)


def decode_only(speculation: Speculation | None) -> SimConfig:
    spec = InstanceSpec(cpu_latency(), EngineLimits(1024, 16, 2048), speculation)
    return SimConfig("decode", decode=spec)


LENGTHS = [(200, 64), (50, 17), (400, 100), (120, 33)] * 6


@pytest.fixture
def tokens_out(monkeypatch) -> dict[str, int]:
    """Tokens each simulated sequence got, from the scheduler's own update."""
    out: dict[str, int] = {}
    update = Scheduler.update_accepted

    def counting(self, batch, new_ids):
        results = update(self, batch, new_ids)
        for seq, ids, _ in results:
            out[seq.req_id] = out.get(seq.req_id, 0) + len(ids)
        return results
    monkeypatch.setattr(Scheduler, "update_accepted", counting)
    return out


@pytest.mark.parametrize("acceptance, faster", [(1.0, True), (0.7, True), (0.0, False)])
def test_decode_speculating_yields_by_acceptance_and_costs_its_verify_rows(tokens_out, acceptance, faster):
    expected = {str(i): n - 1 for i, (_, n) in enumerate(LENGTHS)}   # the first came with it
    plain = simulate(decode_only(None), LENGTHS, rate=2.0)
    assert tokens_out == expected
    tokens_out.clear()
    spec = simulate(decode_only(Speculation(3, acceptance)), LENGTHS, rate=2.0)
    assert tokens_out == expected                   # every request ends at its output length
    mean = lambda res: sum(r.tpot for r in res.records) / len(res.records)
    assert (mean(spec) < mean(plain)) == faster, (mean(spec), mean(plain))
    if acceptance == 1.0:                           # 4 tokens a step of 4 rows each
        assert mean(spec) < 0.5 * mean(plain)
    if not faster:                                  # nothing accepted: the draft rows are paid for
        assert mean(spec) > 1.5 * mean(plain)


def test_the_adaptive_router_divides_by_the_speculative_yield():
    """Tight TPOT (45 ms at batch ~8 of this profile): speculation's yield leaves the decode
    instance room for local prompts; the blocks drain either way (the simulator checks)."""
    slo = SLO(ttft=2.0, tpot=0.045)
    base = split_config().adaptive(slo)
    spec = replace(base, decode=replace(base.decode, speculation=Speculation(3, 0.8)))
    lengths = chatbot_like(120)
    plain, fast = simulate(base, lengths, rate=1.0), simulate(spec, lengths, rate=1.0)
    tpot_ok = lambda res: sum(r.tpot <= slo.tpot for r in res.records) / len(res.records)
    assert tpot_ok(fast) >= tpot_ok(plain)
    assert fast.routes()["local"] >= plain.routes()["local"]


def test_the_planner_bounds_plans_and_writes_deployments_with_speculation():
    from planner.__main__ import parse_speculative
    from planner.deployment import to_deployment
    from planner.rate_search import decode_fluid_rate
    from planner.search import PhaseChoice, Placement
    import argparse
    method, spec = parse_speculative("ngram:3:0.6")
    assert (method, spec) == ("ngram", Speculation(3, 0.6))
    for bad in ("model:3:0.6", "ngram:0:0.6", "ngram:3", "ngram:3:1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_speculative(bad)
    lengths, slo = chatbot_like(200), SLO(ttft=2.0, tpot=0.03)
    plain = decode_only(None).decode
    rates = {a: decode_fluid_rate(replace(plain, speculation=Speculation(3, a)), lengths, slo)
             for a in (0.0, 0.8)}
    base = decode_fluid_rate(plain, lengths, slo)
    assert rates[0.8] > base > rates[0.0]        # yield raises it; rejected drafts' rows only cost
    p = Placement("high", PhaseChoice(1, 1, 1.0), PhaseChoice(1, 1, 1.0), 1, 1, 1, 1.0, 2)
    dep = to_deployment(p, speculative=("ngram", 3))
    assert (dep.decode.speculative, dep.decode.num_speculative_tokens) == ("ngram", 3)
    assert dep.prefill.speculative is None
    assert to_deployment(p).decode.speculative is None
