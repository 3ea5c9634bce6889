"""Where a prompt's prefix is cached: the router's guess, from what it placed (pure policy: no
Triton, no clock).

    tracker = CacheAffinity(block_size=16, capacity_blocks={"decode-0": 1024, ...})
    hashes = tracker.hashes(prompt_ids)              # the chain hash of each full block
    hits = tracker.hits(hashes, len(prompt_ids))     # {instance: prompt tokens it likely holds}
    ... route with `hits` ...
    tracker.placed("decode-0", hashes)               # the instance will hold these blocks

An engine with a prefix cache (prefix_cache.py) keeps a prompt's full blocks after the request
ends and evicts the least recently used when its pool needs room. The orchestrator does not
read the engines' caches; it remembers, per instance, the chain hashes (prefix_cache.block_hash,
the engines' own) of the prompts it sent there, in an LRU as large as the instance's KV pool,
the approximate mode of Dynamo's KV router and SGLang's cache-aware router. The guess is
optimistic when an engine evicted early (its pool also holds running sequences' blocks) and
misses blocks an engine got otherwise (generated tokens, another orchestrator's requests);
either way it only moves a prediction: the engine computes whatever it does not find.

A split request's prompt blocks end up in both its prefill instance's cache and its decode
instance's (the decode engine registers the KV it imports), so both are recorded.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from backends.core.prefix_cache import block_hash


class CacheAffinity:
    def __init__(self, block_size: int, capacity_blocks: Mapping[str, int]) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if any(c < 0 for c in capacity_blocks.values()):
            raise ValueError(f"capacities must be >= 0, got {dict(capacity_blocks)}")
        self.block_size = block_size
        self.capacity = dict(capacity_blocks)
        self._lru: dict[str, OrderedDict[bytes, None]] = {i: OrderedDict() for i in self.capacity}

    def hashes(self, prompt_ids: list[int]) -> list[bytes]:
        """The chain hash of each full block of the prompt, in order."""
        out, parent, bs = [], b"", self.block_size
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            parent = block_hash(parent, prompt_ids[start:start + bs])
            out.append(parent)
        return out

    def hit_tokens(self, instance: str, hashes: list[bytes], prompt_len: int) -> int:
        """Prompt tokens `instance` likely holds: its leading blocks found, up to the last
        token's block (an engine always computes the prompt's last token)."""
        lru = self._lru.get(instance)
        if not lru:
            return 0
        usable = (prompt_len - 1) // self.block_size
        n = 0
        while n < min(usable, len(hashes)) and hashes[n] in lru:
            n += 1
        return n * self.block_size

    def hits(self, hashes: list[bytes], prompt_len: int) -> dict[str, int]:
        """`hit_tokens` of every instance (those with none left out)."""
        out = {i: self.hit_tokens(i, hashes, prompt_len) for i in self._lru}
        return {i: n for i, n in out.items() if n}

    def placed(self, instance: str, hashes: Iterable[bytes]) -> None:
        """`instance` computes or reuses these blocks now: most recently used; the least
        recently used past its capacity are taken as evicted."""
        lru = self._lru.get(instance)
        if lru is None:
            raise KeyError(f"unknown instance {instance!r}")
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity[instance]:
            lru.popitem(last=False)

    def forget(self, instance: str) -> None:
        """The instance restarted: its cache is empty."""
        if instance in self._lru:
            self._lru[instance].clear()
