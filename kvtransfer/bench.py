"""Microbenchmark (not a test): shm fetch of one request's KV between two processes.

    .venv/bin/python -m kvtransfer.bench [--tokens 512] [--iters 50] [--scattered] [--json out.json]

The parent is the prefill side (ShmKVExporter, SmolLM2-135M layout: 30 layers, 3 KV heads,
head_dim 64, bf16, block 16), a spawned child is the decode side (ShmKVImporter into its own
pool). Each iteration grants a fresh lease, the child fetches it and reports TransferStats, the
parent collects the release. Printed beside it, measured in the same run: an in-process torch
copy of the same blocks between private arrays (the ceiling), and the ratio.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import numpy as np

from backends.core.kv_cache import KVLayout, KVPool
from kvtransfer.blockcopy import copy_blocks

SMOLLM2_135M = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")


def _decode_child(conn: Any, dst_layout: KVLayout, scattered: bool) -> None:
    from kvtransfer.descriptor import KVDescriptor
    from kvtransfer.shm import ShmKVImporter
    importer = ShmKVImporter(KVPool(dst_layout))
    step = 0
    try:
        while (text := conn.recv()) is not None:
            desc = KVDescriptor.from_json(text)
            dst_ids = _dst_ids(len(desc.block_ids), step, scattered)
            step += 1
            stats = importer.fetch(desc, dst_ids)
            conn.send((stats.num_bytes, stats.seconds))
    finally:
        importer.close()


def _dst_ids(num_blocks: int, step: int, scattered: bool) -> list[int]:
    """The decode pool has 2x the blocks: alternate halves; scattered = every other block."""
    if scattered:
        return list(range(step % 2, 2 * num_blocks, 2))
    return list(range((step % 2) * num_blocks, (step % 2 + 1) * num_blocks))


def _src_ids(num_blocks: int, step: int) -> list[int]:
    """The prefill pool has 4x the blocks (47 MB > L3 here): rotate through them."""
    return list(range((step % 4) * num_blocks, (step % 4 + 1) * num_blocks))


def _memcpy_seconds(layout: KVLayout, num_blocks: int, iters: int, scattered: bool) -> float:
    """The same block copies between two private arrays in one process (no shm, no checks)."""
    src = np.random.randint(0, 255, (4 * num_blocks, layout.block_nbytes), dtype=np.uint8)
    dst = np.zeros((2 * num_blocks, layout.block_nbytes), dtype=np.uint8)
    times = []
    for step in range(iters):
        start = time.perf_counter()
        copy_blocks(src, dst, _src_ids(num_blocks, step), _dst_ids(num_blocks, step, scattered))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(num_tokens: int = 512, iters: int = 50, scattered: bool = False) -> dict[str, Any]:
    """Measure; returns the numbers it prints."""
    from kvtransfer.shm import ShmKVExporter
    num_blocks = -(-num_tokens // SMOLLM2_135M["block_size"])
    layout = KVLayout(num_blocks=4 * num_blocks, **SMOLLM2_135M)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with ShmKVExporter(layout, "bench-prefill") as exporter:
        exporter.pool.data.normal_()
        dst_layout = KVLayout(num_blocks=2 * num_blocks, **SMOLLM2_135M)
        proc = ctx.Process(target=_decode_child, args=(child, dst_layout, scattered))
        proc.start()
        child.close()  # a crashed child then shows up as EOFError instead of a hang
        try:
            samples = []
            for i in range(iters + 1):
                parent.send(exporter.grant(_src_ids(num_blocks, i), num_tokens).to_json())
                samples.append(parent.recv())
                if len(exporter.collect_released()) != 1:
                    raise RuntimeError("the decode child did not release its lease")
        finally:
            parent.send(None)
            proc.join(timeout=30)
    nbytes = samples[0][0]
    seconds = statistics.median(s for _, s in samples[1:])  # the first one includes attaching
    memcpy = _memcpy_seconds(layout, num_blocks, iters, scattered)
    result = {"num_tokens": num_tokens, "num_blocks": num_blocks, "bytes": nbytes, "iters": iters,
              "scattered": scattered, "first_fetch_seconds": samples[0][1], "seconds": seconds,
              "gb_per_s": nbytes / seconds / 1e9, "memcpy_gb_per_s": nbytes / memcpy / 1e9,
              "ratio_to_memcpy": memcpy / seconds}
    print(f"shm fetch, {num_tokens} tokens ({num_blocks} blocks, SmolLM2-135M layout): "
          f"{nbytes} bytes in {seconds * 1e3:.3f} ms (median of {iters}) = {result['gb_per_s']:.2f} GB/s; "
          f"first fetch incl. attach {samples[0][1] * 1e3:.3f} ms; same copies in-process "
          f"{result['memcpy_gb_per_s']:.2f} GB/s (fetch/memcpy = {result['ratio_to_memcpy']:.2f})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--scattered", action="store_true", help="non-adjacent destination blocks")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    result = run(args.tokens, args.iters, args.scattered)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
