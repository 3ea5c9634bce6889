"""Benchmark workloads (client/bench/workloads.py, datasets.py): arrivals, caps, sampling, the
pool cache, and the loaders on the real data set files that ./build.sh setup fetches."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from client.bench import datasets as ds
from client.bench import pools
from client.bench import workloads as wl
from client.bench.workloads import LengthCaps, Request, WorkloadSpec, arrival_times


def _require(relative):
    try:
        return ds.dataset_path(relative)
    except ds.MissingDataError as e:
        pytest.skip(f"data set missing: {e}")


@pytest.fixture(scope="module")
def sharegpt():
    return ds.read_sharegpt(_require(ds.SHAREGPT_FILE))


# ---- arrivals --------------------------------------------------------------------------------

def test_poisson_arrivals_have_the_rate_and_are_seeded():
    times = np.array(arrival_times(20_000, rate=4.0, seed=7))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps > 0)
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)       # exponential: CV 1
    assert arrival_times(100, 4.0, seed=7) == arrival_times(100, 4.0, seed=7)
    assert arrival_times(100, 4.0, seed=7) != arrival_times(100, 4.0, seed=8)


def test_one_seed_gives_the_same_pattern_at_every_rate():
    slow, fast = np.array(arrival_times(500, 1.0, seed=3)), np.array(arrival_times(500, 5.0, seed=3))
    assert fast == pytest.approx(slow / 5)


def test_gamma_arrivals_are_burstier_with_the_same_rate():
    times = np.array(arrival_times(40_000, rate=2.0, cv=3.0, seed=1))
    gaps = np.diff(times)
    assert len(times) / times[-1] == pytest.approx(2.0, rel=0.06)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_arrivals_validate():
    with pytest.raises(ValueError):
        arrival_times(10, rate=0.0)
    with pytest.raises(ValueError):
        arrival_times(10, rate=1.0, cv=0.0)


# ---- caps --------------------------------------------------------------------------------------

def req(prompt_len: int, output_len: int) -> Request:
    return Request(tuple(range(prompt_len)), output_len, "test")


def test_caps_truncate_keeps_the_first_prompt_tokens():
    r = LengthCaps(max_prompt_tokens=8, max_output_tokens=5).apply(req(20, 50))
    assert r.prompt_ids == tuple(range(8)) and r.output_len == 5
    assert LengthCaps(max_prompt_tokens=8).apply(req(3, 50)) == req(3, 50)


def test_caps_filter_drops_what_is_too_long():
    caps = LengthCaps(max_prompt_tokens=8, max_output_tokens=5, mode="filter")
    assert caps.apply(req(20, 2)) is None and caps.apply(req(2, 20)) is None
    assert caps.apply(req(8, 5)) == req(8, 5)


def test_caps_scale_then_cap():
    r = LengthCaps(prompt_scale=0.5, output_scale=0.1, max_output_tokens=30).apply(req(10, 1000))
    assert (r.prompt_len, r.output_len) == (5, 30)
    assert LengthCaps(output_scale=0.01).apply(req(10, 20)).output_len == 1     # never 0


@pytest.mark.parametrize("kwargs", [dict(max_prompt_tokens=0), dict(prompt_scale=1.5),
                                    dict(output_scale=0), dict(mode="clip")])
def test_caps_validate(kwargs):
    with pytest.raises(ValueError):
        LengthCaps(**kwargs)


def test_paper_filter():
    # the DistServe artifact: drop if prompt AND output < 4 tokens, or prompt + output >= 2048
    assert wl.passes_paper_filter("chatbot", req(4, 4))
    assert wl.passes_paper_filter("chatbot", req(3, 100)) and wl.passes_paper_filter("chatbot", req(100, 3))
    assert not wl.passes_paper_filter("chatbot", req(3, 3))
    assert wl.passes_paper_filter("chatbot-history", req(1500, 547))
    assert not wl.passes_paper_filter("chatbot-history", req(1500, 548))
    assert wl.passes_paper_filter("code", req(2, 2)) and not wl.passes_paper_filter("code", req(2000, 48))
    assert wl.passes_paper_filter("summarization", req(2000, 300))


# ---- the real files ----------------------------------------------------------------------------

def test_sharegpt_parses_record_by_record_and_drops_the_broken_tail(sharegpt):
    path = ds.dataset_path(ds.SHAREGPT_FILE)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text(encoding="utf-8", errors="replace"))
    assert 17_500 <= len(sharegpt.conversations) <= 17_700          # 17,671
    assert 0 < sharegpt.num_tail_bytes < 1_000_000
    assert all("conversations" in c and "id" in c for c in sharegpt.conversations)
    exchanges = [ds.first_exchange(c) for c in sharegpt.conversations]
    assert sum(e is not None for e in exchanges) > 17_000


def test_sharegpt_chatbot_lengths_are_plausible(sharegpt, smollm_tokenizer):
    rng = np.random.default_rng(0)
    picks = rng.choice(len(sharegpt.conversations), size=400, replace=False)
    reqs = [pools.chatbot_request(smollm_tokenizer, sharegpt.conversations[i]) for i in picks]
    reqs = [r for r in reqs if r is not None and wl.passes_paper_filter("chatbot", r)]
    assert len(reqs) > 300
    prompts, outputs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    assert 10 <= np.median(prompts) <= 100           # short first turns (~25 tokens)
    assert 150 <= np.median(outputs) <= 450          # long replies (~300 tokens)
    assert max(p + o for p, o in zip(prompts, outputs)) < 2048


def test_sharegpt_history_prompts_are_longer(sharegpt, smollm_tokenizer):
    records = [c for c in sharegpt.conversations[:600] if len(c["conversations"]) >= 3]
    rng = np.random.default_rng(0)
    reqs = [pools.history_request(smollm_tokenizer, c, int(rng.integers(1, len(c["conversations"]))))
            for c in records]
    kept = [r for r in reqs if r is not None]
    assert 0.3 * len(records) < len(kept) < len(records)         # some exceed 2048 tokens
    assert all(r.prompt_len + r.output_len < 2048 for r in kept)
    assert np.median([r.prompt_len for r in kept]) > 100         # multi-turn histories
    one_turn = pools.history_request(smollm_tokenizer, records[0], 1)
    first = records[0]["conversations"]
    assert one_turn.prompt_ids == tuple(smollm_tokenizer.encode(first[0]["value"]))
    assert one_turn.output_len == len(smollm_tokenizer.encode(first[1]["value"]))


def test_humaneval_has_164_problems_with_plausible_lengths(smollm_tokenizer):
    problems = ds.read_humaneval(_require(ds.HUMANEVAL_FILE))
    assert len(problems) == 164
    reqs = [pools.code_request(smollm_tokenizer, p) for p in problems]
    assert reqs[0].source == "HumanEval/0"
    assert 80 <= np.median([r.prompt_len for r in reqs]) <= 200      # ~120
    assert 25 <= np.median([r.output_len for r in reqs]) <= 100      # ~50
    assert all(wl.passes_paper_filter("code", r) for r in reqs)


def test_summarization_proxy(sharegpt, smollm_tokenizer):
    tok = smollm_tokenizer
    lengths = pools.summary_lengths(tok, sharegpt.conversations)
    assert 60 <= len(lengths) <= 200                                  # 91 real summaries
    assert 100 <= np.median(lengths) <= 300 and min(lengths) >= pools.SUMMARY_MIN_REPLY_TOKENS
    reqs = pools.summarization_requests(tok, sharegpt.conversations[:300], lengths)
    assert len(reqs) > 50                                             # long conversations
    header, footer = tok.encode(pools.SUMMARY_HEADER), tok.encode(pools.SUMMARY_FOOTER, add_special_tokens=False)
    for r in reqs:
        assert 1900 <= r.prompt_len <= 2048
        assert r.prompt_ids[:len(header)] == tuple(header)
        assert r.prompt_ids[-len(footer):] == tuple(footer)
        assert r.output_len in lengths
    assert len({r.prompt_len for r in reqs}) > 10                     # drawn, not constant


# ---- sampling and the pool cache ---------------------------------------------------------------

def test_pool_is_cached_and_sampling_is_seeded(tmp_path, gguf_path, smollm_tokenizer, monkeypatch):
    source = _require(ds.HUMANEVAL_FILE)
    (tmp_path / "humaneval").mkdir()
    with gzip.open(source, "rt") as f:
        lines = f.readlines()[:12]
    with gzip.open(tmp_path / ds.HUMANEVAL_FILE, "wt") as f:
        f.writelines(lines)
    from backends.core.tokenizer import Tokenizer
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, path: smollm_tokenizer))
    built = wl.load_pool("code", gguf_path, tmp_path)
    assert len(built.requests) == 12 and built.info["num_problems"] == 12
    assert len(list((tmp_path / "cache").glob("code-*.npz"))) == 1

    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, path: 1 / 0))   # a hit must not
    assert wl.load_pool("code", gguf_path, tmp_path) == built

    spec = WorkloadSpec("code", num_requests=8, seed=5, caps=LengthCaps(max_output_tokens=16))
    a, b = wl.load_workload(spec, gguf_path, tmp_path), wl.load_workload(spec, gguf_path, tmp_path)
    assert a.requests == b.requests and len(a.requests) == 8
    assert len({r.source for r in a.requests}) == 8                  # without replacement
    assert all(r.output_len <= 16 for r in a.requests)
    other = wl.load_workload(WorkloadSpec("code", 8, seed=6), gguf_path, tmp_path)
    assert [r.source for r in other.requests] != [r.source for r in a.requests]
    many = wl.load_workload(WorkloadSpec("code", 30, seed=5), gguf_path, tmp_path)
    assert len(many.requests) == 30                                   # with replacement
    described = a.describe()
    assert described["caps"]["max_output_tokens"] == 16 and described["num_eligible"] == 12
    assert described["lengths"]["output"]["max"] <= 16


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(ds.MissingDataError, match="build.sh setup"):
        wl.load_pool("chatbot", wl.DEFAULT_TOKENIZER, tmp_path)
    with pytest.raises(ValueError, match="chatbot"):
        WorkloadSpec("chat", 10)


def test_unsendable_and_filtered_requests_are_never_sampled(monkeypatch):
    pool = pools.Pool("chatbot", (Request((), 50, "empty"), req(3, 3), req(2000, 100), req(10, 20)), {})
    monkeypatch.setattr(wl, "load_pool", lambda *a, **k: pool)
    w = wl.load_workload(WorkloadSpec("chatbot", 5, seed=1))
    assert w.num_eligible == 1 and {r.prompt_len for r in w.requests} == {10}
    w = wl.load_workload(WorkloadSpec("chatbot", 5, seed=1, paper_filter=False))
    assert w.num_eligible == 3 and all(r.prompt_len > 0 for r in w.requests)
    with pytest.raises(ValueError, match="no chatbot request is left"):
        wl.load_workload(WorkloadSpec("chatbot", 5, caps=LengthCaps(max_output_tokens=5, mode="filter")))
