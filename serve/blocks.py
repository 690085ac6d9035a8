"""The KV cache's bookkeeping: fixed-size blocks handed to sequences on demand, and the prefix cache.

A sequence holds a list of block ids (its block table row); position ``p`` of it lives in slot
``blocks[p // size] * size + p % size`` of every layer's cache. Blocks are taken as a sequence grows and given
back when it ends, so a short request holds only what it uses. Block 0 is never handed out: the step's padding
tokens write there.

Prefix cache: a full block of prompt tokens is keyed by the hash of (its adapter, the key of the block before
it, its tokens), so equal keys mean equal KV. A later prompt with the same prefix shares those blocks
(reference-counted) instead of computing them. A block whose last holder ended stays cached until its slot is
needed: the free list hands out never-cached blocks first, then the least recently used cached ones.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


def block_keys(tokens: list[int], size: int, adapter: str | None) -> list[bytes]:
    """The prefix-cache key of each full block of ``tokens`` (a chain: each key covers the whole prefix)."""
    keys, prev = [], (adapter or "").encode()
    for i in range(0, len(tokens) - size + 1, size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(b",".join(str(t).encode() for t in tokens[i:i + size]))
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass
class CacheStats:
    queries: int = 0  # prompt blocks looked up
    hits: int = 0  # ... found cached
    evictions: int = 0


class BlockPool:
    """``count`` blocks of ``size`` positions; block 0 is reserved for padding writes."""

    def __init__(self, count: int, size: int, prefix_caching: bool = True):
        if count < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {count}")
        self.count, self.size, self.prefix_caching = count, size, prefix_caching
        self.free: list[int] = list(range(count - 1, 0, -1))  # never cached: popped from the end
        self.refs = [0] * count
        self.key_of: dict[int, bytes] = {}  # block -> its prefix key (cached blocks only)
        self.cached: dict[bytes, int] = {}  # prefix key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self.stats = CacheStats()

    # ---------------------------------------------------------------- counts

    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached but held by nobody)."""
        return len(self.free) + len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.size)

    # ---------------------------------------------------------------- taking and giving back

    def take(self) -> int:
        """One block for a sequence (never-cached first, else the least recently used idle cached one)."""
        if self.free:
            b = self.free.pop()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of.pop(b)]
            self.stats.evictions += 1
        else:
            raise MemoryError("no free KV block")
        self.refs[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        """A sequence gives its blocks back; cached ones stay findable until their slot is needed."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None
                else:
                    self.free.append(b)

    # ---------------------------------------------------------------- the prefix cache

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``keys``, now held by the caller."""
        if not self.prefix_caching:
            return []
        out = []
        for k in keys:
            b = self.cached.get(k)
            if b is None:
                break
            if self.refs[b] == 0:
                self.idle.pop(b, None)
            self.refs[b] += 1
            out.append(b)
        self.stats.queries += len(keys)
        self.stats.hits += len(out)
        return out

    def publish(self, block: int, key: bytes) -> None:
        """Block ``block`` now holds the KV of the prefix ``key`` (its writes are queued): later prompts may share it."""
        if not self.prefix_caching or block in self.key_of:
            return
        if key in self.cached:  # another sequence computed the same prefix meanwhile: keep the first
            return
        self.cached[key] = block
        self.key_of[block] = key

    def report(self) -> dict[str, float | int]:
        s = self.stats
        return {"blocks": self.count - 1, "block_size": self.size, "blocks_free": self.available(),
                "prefix_cached_blocks": len(self.cached), "prefix_queries": s.queries, "prefix_hits": s.hits,
                "prefix_hit_rate": round(s.hits / s.queries, 4) if s.queries else 0.0,
                "prefix_evictions": s.evictions}
