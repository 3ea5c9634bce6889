"""The router's guess of where a prompt's prefix is cached (backends/core/cache_affinity.py),
and the router and dispatcher following it: a conversation's next turn goes where its history
is cached, unless that instance is loaded enough to lose the advantage."""
from __future__ import annotations

import pytest

from backends.core.cache_affinity import CacheAffinity
from backends.core.prefix_cache import block_hash
from backends.core.router import InstanceState, route
from planner.rate_search import SLO
from tests.test_dispatch import make
from tests.test_router import Linear

BS = 4


def test_hashes_are_the_engines_chain_over_full_blocks():
    a = CacheAffinity(BS, {"d0": 8})
    ids = list(range(10))                                   # 2 full blocks, 2 tokens over
    h = a.hashes(ids)
    assert h == [block_hash(b"", ids[:4]), block_hash(block_hash(b"", ids[:4]), ids[4:8])]
    assert a.hashes(ids[:3]) == []


def test_hits_are_the_leading_blocks_found_and_leave_the_last_token():
    a = CacheAffinity(BS, {"d0": 8, "d1": 8})
    turn1 = list(range(12))
    a.placed("d0", a.hashes(turn1))
    turn2 = turn1 + [50, 51, 52, 53, 54]
    assert a.hits(a.hashes(turn2), len(turn2)) == {"d0": 12}
    assert a.hit_tokens("d0", a.hashes(turn1), len(turn1)) == 8     # the last token's block: computed
    other = [99] + turn1[1:]                                 # a different first block: nothing chains
    assert a.hits(a.hashes(other), len(other)) == {}
    with pytest.raises(KeyError):
        a.placed("nope", [])


def test_the_guess_forgets_least_recently_used_blocks_past_the_pool():
    a = CacheAffinity(BS, {"d0": 3})
    x, y = list(range(8)), list(range(100, 108))
    a.placed("d0", a.hashes(x))
    a.placed("d0", a.hashes(y))                              # 4 blocks for 3: x's first goes
    assert a.hit_tokens("d0", a.hashes(x + [1]), 9) == 0     # (a chain breaks at its first block)
    assert a.hit_tokens("d0", a.hashes(y + [1]), 9) == 8
    a.forget("d0")
    assert a.hits(a.hashes(y + [1]), 9) == {}


def test_the_router_prefills_only_what_is_not_cached():
    d0 = InstanceState("d0", "decode", 1000, num_running=2, running_context=400, local_prefill=True)
    d1 = InstanceState("d1", "decode", 1000, num_running=2, running_context=400, local_prefill=True)
    p = InstanceState("p0", "prefill", 1000, queued_tokens=3000, queued_requests=2)
    slo = SLO(ttft=0.2, tpot=0.1)
    cold = route(1600, 50, slo, [p], [d0, d1], Linear())
    warm = route(1600, 50, slo, [p], [d0, d1], Linear(), hits={"d1": 1584})
    assert cold.chosen.decode == "d0"                      # ties go to the first
    assert warm.kind == "local" and warm.chosen.decode == "d1" and warm.chosen.meets_slo
    assert warm.chosen.ttft_s < cold.chosen.ttft_s and "1584 prompt tokens cached" in warm.chosen.reason
    split = route(1600, 50, slo, [p], [d0], Linear(), hits={"p0": 1584}).options[0]
    assert split.ttft_s == pytest.approx(Linear().prefill_time([1500, 1500]) + Linear().prefill_time([16]))
    with pytest.raises(ValueError, match="cached tokens"):
        route(100, 5, slo, [p], [d0], Linear(), hits={"d0": 100})


def test_the_dispatcher_sends_the_next_turn_where_its_history_is_cached():
    def decode(i, running):
        return InstanceState(f"decode-{i}", "decode", 1000, num_running=running,
                             running_context=200 * running, local_prefill=True,
                             max_num_batched_tokens=4096)
    states = {"prefill-0": InstanceState("prefill-0", "prefill", 1000, queued_tokens=20_000,
                                         queued_requests=10),
              "decode-0": decode(0, 1), "decode-1": decode(1, 1)}
    affinity = CacheAffinity(16, {"prefill-0": 1024, "decode-0": 1024, "decode-1": 1024})
    from backends.orchestrator.dispatch import SLOs
    d = make(states, mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear(), affinity=affinity)
    history = [7] * 1000
    first = d.place(len(history), 16, prompt_ids=history)
    assert (first.kind, first.decode) == ("local", "decode-0")
    # the instances' states caught up: turn 1 decodes on decode-0, now the busier one
    states["decode-0"] = decode(0, 3)
    d.recent.clear()
    turn2 = history + [8] * 100
    second = d.place(len(turn2), 16, prompt_ids=turn2)
    chosen = next(o for o in second.decision["options"]
                  if o["kind"] == "local" and o["decode"] == second.decode)
    assert second.decode == "decode-0" and "992 prompt tokens cached" in chosen["reason"]
    # without the affinity, the same state: the less busy decode-1
    plain = make(states, mode="adaptive", slo=SLOs(1.0, 0.1), predictor=Linear())
    assert plain.place(len(turn2), 16, prompt_ids=turn2).decode == "decode-1"
