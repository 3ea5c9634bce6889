"""The simulator and a real engine, driven with the same arrivals and step times, must agree:
the same requests in every step's batch, the same first-token and finish times. A copy of the
engine's scheduling or update logic in the simulator that drifts makes this fail."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.sampling import SamplingParams
from planner.latency import LatencyModel
from planner.simulator import InstanceSpec, Request, SimConfig, Simulator, _Engine

LIMITS = dict(num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=48, block_size=4)
LATENCY = LatencyModel("toy", "cpu", 1, (0.01, 1e-3, 0.0), (0.005, 1e-5, 1e-3), (0.005, 1e-5, 1e-3))


def make_requests(n: int = 16, seed: int = 3) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(40.0)                      # bursts: the batch and block limits bind
        out.append(Request(i, t, rng.randint(3, 40), rng.randint(2, 16)))
    return out


def simulate(requests: list[Request], chunked: bool) -> tuple[list[list[int]], dict[int, tuple]]:
    spec = InstanceSpec(LATENCY, EngineLimits(chunked_prefill=chunked, **LIMITS))
    steps: list[list[int]] = []
    real = _Engine.step_time

    def spy(self, batch):
        steps.append([int(s.req_id) for s in batch.seqs])
        return real(self, batch)
    _Engine.step_time = spy
    try:
        result = Simulator(SimConfig("colocated", prefill=spec), requests).run()
    finally:
        _Engine.step_time = real
    return steps, {r.req.req_id: (r.first_token, r.finish) for r in result.records}


def run_engine(tiny_llama, requests: list[Request], chunked: bool):
    """The engine on a simulated clock: a step starts when the last one ends (or at the next
    arrival when idle), takes the latency model's time for its batch, and every request that
    arrived by then is added before it is scheduled."""
    limits = EngineLimits(chunked_prefill=chunked, **LIMITS)
    # the simulator models no prefix cache (and these prompts repeat one token: all would hit)
    engine = LLMEngine(*tiny_llama, EngineConfig(dtype="float32", limits=limits, prefix_caching=False))
    spec = SimpleNamespace(spec=InstanceSpec(LATENCY, limits))
    steps, durations = [], []

    def fake_execute(batch):                            # the fake model runner: no model
        steps.append([int(s.req_id) for s in batch.seqs])
        durations.append(_Engine.step_time(spec, batch))
        return [0] * len(batch.sampled_seqs)
    engine.runner.execute = fake_execute
    pending, now, times = list(requests), 0.0, {}
    while pending or engine.has_unfinished():
        if not engine.has_unfinished():
            now = max(now, pending[0].arrival)
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            engine.add_request(str(r.req_id), [7] * r.prompt_len,
                               SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
        outputs = engine.step()
        now += durations[-1]
        for out in outputs:
            first, _ = times.get(int(out.req_id), (None, None))
            times[int(out.req_id)] = (now if first is None else first, now if out.finished else None)
    assert engine.blocks.num_used == 0
    return steps, times


@pytest.mark.parametrize("chunked", [False, True])
def test_simulator_follows_the_engine(tiny_llama, chunked: bool) -> None:
    requests = make_requests()
    sim_steps, sim_times = simulate(requests, chunked)
    eng_steps, eng_times = run_engine(tiny_llama, requests, chunked)
    assert len(sim_steps) > len(requests)                # several requests share steps
    assert max(map(len, sim_steps)) == LIMITS["max_num_seqs"]   # the batch limit binds
    assert sim_steps == eng_steps
    for req_id, (first, finish) in eng_times.items():
        assert sim_times[req_id] == pytest.approx((first, finish), abs=1e-9), req_id
    order = lambda times: sorted(times, key=lambda i: (times[i][1], i))   # noqa: E731
    assert order(sim_times) == order(eng_times)
