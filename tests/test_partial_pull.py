"""The decode-side partial pull (issue 14): a decode instance that holds a prompt's leading
blocks in its prefix cache (e.g. the conversation's previous turn decoded there) shares them
and copies only the rest from the prefill pool; the transport copies a descriptor's tail and
still checks and releases the lease on every block."""
from __future__ import annotations

import pytest
import torch

from backends.core.engine import EngineConfig, LLMEngine
from backends.core.limits import EngineLimits
from backends.core.messages import GenerateRequest, PrefillRequest, Tokens
from backends.core.sampling import SamplingParams
from backends.decode.worker import DecodeWorker
from backends.prefill.worker import PrefillWorker
from kvtransfer import make_exporter, make_importer
from tests.helpers import assert_no_leaks
from tests.kvtransfer_fixtures import (  # noqa: F401 (fixtures, the leak check autouse)
    assert_blocks_equal, dst_pool, exporter, importer, shm_leak_check)
from tests.test_workers import _decode_all, _decode_request, _prefill, _tokens, messages


def test_a_tail_is_copied_and_the_whole_lease_released(exporter, importer, dst_pool):
    desc = exporter.grant([5, 6, 7], 10)
    before = dst_pool.data.clone()
    stats = importer.fetch(desc, [2], skip_blocks=2)
    assert_blocks_equal(exporter.pool, [7], dst_pool, [2])
    untouched = [b for b in range(dst_pool.data.shape[0]) if b != 2]
    assert torch.equal(dst_pool.data[untouched], before[untouched])       # the held blocks
    assert stats.num_bytes == desc.layout.block_nbytes
    assert exporter.collect_released() == [desc.lease_id] and exporter.num_leases == 0


@pytest.mark.parametrize("skip,dst,match", [(-1, [0, 1, 2, 3], "skip_blocks"),
                                            (4, [], "skip_blocks"), (True, [0, 1], "skip_blocks"),
                                            (1, [0, 1, 2], "2 source blocks to copy")])
def test_a_bad_skip_reads_nothing(exporter, importer, dst_pool, skip, dst, match):
    desc = exporter.grant([0, 1, 2], 10)
    before = dst_pool.data.clone()
    with pytest.raises(ValueError, match=match):
        importer.fetch(desc, dst, skip_blocks=skip)
    assert torch.equal(dst_pool.data, before) and exporter.collect_released() == []
    exporter.revoke(desc.lease_id)


def test_the_next_turn_pulls_only_the_blocks_decode_does_not_hold(tiny_llama):
    """Turn 1 is prefilled locally on the decode instance (it caches its blocks); turn 2 =
    turn 1 + its output + more, prefilled on the prefill instance, is handed to that decode
    instance, which shares the blocks it holds and copies only the rest; its tokens equal one
    engine's; nothing is left held."""
    config, sd = tiny_llama
    limits = dict(block_size=4, chunked_prefill=True)
    pcfg = EngineConfig(dtype="float32", role="prefill", limits=EngineLimits(64, block_size=4))
    exporter = make_exporter("shm", LLMEngine.kv_layout(config, pcfg), "prefill-0", lease_timeout_s=5.0)
    prefill = PrefillWorker(LLMEngine(config, sd, pcfg, kv_pool=exporter.pool), exporter, "prefill-0")
    dengine = LLMEngine(config, sd, EngineConfig(dtype="float32", role="decode",
                                                 limits=EngineLimits(64, **limits)))
    decode = DecodeWorker(dengine, make_importer("shm", dengine.kv), "decode-0")
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True)
    try:
        turn1 = list(range(3, 30))                                  # 27 tokens: 6 full blocks
        decode.submit(GenerateRequest("t1", turn1, params))
        out1 = _tokens(_decode_all(decode)["t1"])
        turn2 = turn1 + out1 + list(range(40, 50))                  # 43 tokens: 10 full blocks
        req = PrefillRequest("t2", turn2, params)
        res = _prefill(prefill, [req])["t2"]
        bytes_before = decode.kv_bytes
        decode.submit(_decode_request(req, res))
        out2 = _tokens(_decode_all(decode)["t2"])
        copied = (decode.kv_bytes - bytes_before) // res.kv.layout.block_nbytes
        # turn 1's 27 prompt tokens + 5 of its outputs were cached as 8 full blocks: 3 of 11 copied
        assert len(res.kv.block_ids) == 11 and copied == 3
        assert dengine.stats().prefix.num_hit_tokens >= 32
        one = LLMEngine(config, sd, EngineConfig(dtype="float32", limits=EngineLimits(64, block_size=4)))
        one.add_request("t2", turn2, params)
        ref = []
        while one.has_unfinished():
            ref += [t for o in one.step() for t in o.new_token_ids]
        assert [res.first_token_id] + out2 == ref
        for _ in range(3):
            messages(prefill)                                       # the lease back: blocks freed
        assert_no_leaks(dengine)
    finally:
        decode.close()
        prefill.close()
