"""Prefix cache: full KV blocks found again by their tokens (vLLM's automatic prefix caching).

Lifecycle of a cached block: a sequence fills a block and the scheduler registers it
(`register`) -> it stays in its sequence's block table, and another prompt that starts with the
same tokens takes it too (`match`, then BlockManager.share: one more reference) -> when no
sequence holds it any more it is free but cached: parked at the tail of an LRU list and still
found by `match` -> a hit takes it back (`unpark`), or the pool, out of never-used blocks,
evicts the least recently used one (`evict`: it leaves the index, its bytes get overwritten).

Keys. Block i's hash is blake2b(hash of block i-1 || its token ids), vLLM's chain, so anyone
holding the tokens (a router) can compute it. The hash only finds candidates: a lookup takes a
block only if its tokens equal the prompt's and its parent is the block matched just before it,
named by a node id that is never reused (a block id is: an evicted parent's id may come back
holding other tokens). So by induction a hit's whole prefix equals the prompt's, and a hash
collision costs a miss, never wrong KV. Two sequences that computed the same block each hold a
copy; the first registered is the one found, the second records the first's node as its own,
so its later blocks still chain on.

Only full blocks whose K/V are written (below the sequence's `num_cached`) are registered:
slots a speculative verify step rolled back, or a prompt chunk not yet run, never are. A
match always leaves a prompt's last token to compute (its logits give the next token).
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.core.sequence import Sequence

ROOT = 0                    # the parent node of a sequence's first block


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The chain hash of a block: its parent's hash (b"" for a first block) and its token ids."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class CachedBlock:
    hash: bytes
    tokens: tuple[int, ...]
    parent: int                 # node of the block before it (ROOT for a first block)
    node: int                   # this block's content: unique for the cache's lifetime


@dataclass
class PrefixStats:
    """Lookups, counted once per admission (a preempted sequence counts again when re-admitted),
    and evictions."""
    num_queries: int = 0        # admissions looked up
    num_hits: int = 0           # admissions that reused at least one block
    num_query_tokens: int = 0   # their tokens
    num_hit_tokens: int = 0     # of those, tokens whose K/V came from the cache
    num_evicted: int = 0        # cached blocks given up for new ones

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += 1
        self.num_hits += num_hit_tokens > 0
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens


class PrefixCache:
    """The index of cached blocks (hash -> blocks) and the LRU list of those no sequence holds.
    The BlockManager owns reference counts and calls `park` / `unpark` / `evict`."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._index: dict[bytes, list[int]] = {}        # hash -> block ids (several: a collision)
        self._blocks: dict[int, CachedBlock] = {}       # block id -> what it holds
        self._lru: OrderedDict[int, None] = OrderedDict()   # cached, held by none; oldest first
        self._nodes = itertools.count(ROOT + 1)
        self.stats = PrefixStats()

    @property
    def num_cached(self) -> int:
        """Blocks in the index, held or not."""
        return len(self._blocks)

    @property
    def num_free(self) -> int:
        """Cached blocks no sequence holds (evictable)."""
        return len(self._lru)

    def holds(self, block_id: int) -> bool:
        return block_id in self._blocks

    def block(self, block_id: int) -> CachedBlock | None:
        return self._blocks.get(block_id)

    # -- lookups and registration ---------------------------------------------------------
    def match(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`'s tokens in full blocks, short of
        its last token; `seq.block_nodes` becomes their nodes. Takes no reference."""
        bs = self.block_size
        n = (seq.num_tokens - 1) // bs
        hashes = self._hashes(seq, n)
        found, nodes, parent = [], [], ROOT
        for i in range(n):
            b = self._find(hashes[i], parent, tuple(seq.token_ids(i * bs, (i + 1) * bs)))
            if b is None:
                break
            parent = self._blocks[b].node
            found.append(b)
            nodes.append(parent)
        seq.block_nodes = nodes
        return found

    def register(self, seq: Sequence) -> None:
        """Cache `seq`'s full blocks whose K/V are written (below `num_cached`), from the first
        it has no node for. A block equal to one cached already stays private to `seq`."""
        bs, nodes = self.block_size, seq.block_nodes
        n = seq.num_cached // bs
        if len(nodes) >= n:
            return
        hashes = self._hashes(seq, n)
        for i in range(len(nodes), n):
            parent = nodes[i - 1] if i else ROOT
            tokens = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            b = self._find(hashes[i], parent, tokens)
            if b is None:
                b = seq.block_ids[i]
                self._blocks[b] = CachedBlock(hashes[i], tokens, parent, next(self._nodes))
                self._index.setdefault(hashes[i], []).append(b)
            nodes.append(self._blocks[b].node)

    def _find(self, h: bytes, parent: int, tokens: tuple[int, ...]) -> int | None:
        for b in self._index.get(h, ()):
            c = self._blocks[b]
            if c.parent == parent and c.tokens == tokens:
                return b
        return None

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The chain hashes of `seq`'s first `n` full blocks (kept on it: tokens only grow)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    # -- free but cached: the LRU list ----------------------------------------------------
    def park(self, block_id: int) -> None:
        """A cached block's last holder let go: most recently used now."""
        self._lru[block_id] = None

    def unpark(self, block_id: int) -> None:
        """A hit takes a parked block back."""
        del self._lru[block_id]

    def evict(self) -> int:
        """The least recently used parked block, out of the index, for the pool to reuse."""
        b, _ = self._lru.popitem(last=False)
        c = self._blocks.pop(b)
        self.stats.num_evicted += 1
        same_hash = self._index[c.hash]
        same_hash.remove(b)
        if not same_hash:
            del self._index[c.hash]
        return b
