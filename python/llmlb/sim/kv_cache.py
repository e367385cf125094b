"""A paged KV cache with automatic prefix caching, modelled on vLLM's (v1) block pool. Pure logic.

The cache has ``capacity`` blocks of ``block_size`` tokens. A request holds blocks for its whole
prompt plus its output, taken at admission (so no request is ever preempted). Only FULL prompt
blocks are content-addressed: block ``i``'s hash is ``blake2b(hash(i - 1) + bytes of block i)``, the
first block's parent being a hash of the model and LoRA adapter names. A block therefore matches
only when every block before it matches too, and different adapters never share blocks.

A block is in one of three states:

- free: holds nothing;
- in use: referenced by one or more running requests (never evicted);
- cached: unreferenced but still holding a computed prefix block, kept in LRU order and evicted
  (oldest first) only when an allocation runs out of free blocks.

Evicting a block makes its chained descendants unreachable (a lookup stops at the first miss), but
they stay where they are and age out of the LRU like any other unreferenced block. Requests release
their blocks tail first, so a finished request's later blocks are evicted before its earlier ones.

A request's blocks become cached as its prefill computes them (:meth:`KVCache.commit`), not at
admission: a request admitted while another with the same prefix is still prefilling misses. If two
requests compute the same block at once, the second keeps a private (uncached) copy, as in vLLM.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


def root_hash(model: str, adapter: str | None) -> bytes:
    """The parent hash of a request's first block: model and adapter separate the caches."""
    return hashlib.blake2b(f"{model}\0{adapter or ''}".encode(), digest_size=8).digest()


def block_hashes(prompt: bytes, root: bytes, block_bytes: int, full_blocks: int) -> list[bytes]:
    """Chained hashes of the first `full_blocks` blocks of `prompt` (`block_bytes` bytes each)."""
    hashes = []
    parent = root
    for i in range(full_blocks):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(prompt[i * block_bytes : (i + 1) * block_bytes])
        parent = h.digest()
        hashes.append(parent)
    return hashes


@dataclass
class Allocation:
    """The blocks one request holds: referenced cached blocks (in prompt order) and private ones."""

    hashes: list[bytes]
    """Hashes of the request's full prompt blocks (all of them, cached or not)."""
    cached_blocks: int
    """Leading blocks that were already cached at admission."""
    held: list[bytes] = field(default_factory=list)
    """Hashes of the cached blocks this request references (a prefix of ``hashes``, minus duplicates)."""
    committed: int = 0
    """Leading prompt blocks handled so far (cached at admission or committed after computing)."""
    private: int = 0
    """Blocks held outside the hash table: partial prompt block, output blocks, duplicates."""


class KVCache:
    """Block accounting with prefix caching; see the module docstring for the model."""

    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError("capacity and block_size must be at least 1")
        self.capacity = capacity
        self.block_size = block_size
        self._refs: dict[bytes, int] = {}
        """Every block with a hash (in use or cached): its reference count."""
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        """Unreferenced hashed blocks, least recently released first."""
        self._free = capacity
        """Blocks holding nothing."""

    # ----------------------------------------------------------------------------------------------
    # state

    @property
    def free_blocks(self) -> int:
        """Blocks holding nothing."""
        return self._free

    @property
    def cached_blocks(self) -> int:
        """Unreferenced blocks still holding a prefix (evictable)."""
        return len(self._lru)

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by requests."""
        return self.capacity - self._free - len(self._lru)

    @property
    def usage(self) -> float:
        """``used_blocks / capacity``: what vLLM reports as ``kv_cache_usage_perc``."""
        return self.used_blocks / self.capacity

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._refs

    def refcount(self, block_hash: bytes) -> int:
        return self._refs.get(block_hash, 0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ----------------------------------------------------------------------------------------------
    # requests

    def lookup(self, hashes: list[bytes], prompt_tokens: int) -> int:
        """Leading blocks of `hashes` that are cached, never covering the whole prompt (at least one
        prompt token is always computed, as in vLLM)."""
        limit = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        refs = self._refs
        hit = 0
        while hit < limit and hashes[hit] in refs:
            hit += 1
        return hit

    def fits_ever(self, total_tokens: int) -> bool:
        """Whether a request of `total_tokens` (prompt + output) fits in an empty cache."""
        return self.blocks_for(total_tokens) <= self.capacity

    def allocate(self, hashes: list[bytes], prompt_tokens: int, output_tokens: int) -> Allocation | None:
        """Takes every block the request needs (evicting LRU cached blocks), or None if they are not
        available now. The leading cached blocks are referenced instead of computed."""
        hit = self.lookup(hashes, prompt_tokens)
        total = self.blocks_for(prompt_tokens + output_tokens)
        # Hit blocks that sit in the LRU stop being available once referenced.
        hit_unreferenced = sum(1 for h in hashes[:hit] if self._refs[h] == 0)
        if total - hit > self._free + len(self._lru) - hit_unreferenced:
            return None
        for h in hashes[:hit]:
            if self._refs[h] == 0:
                del self._lru[h]
            self._refs[h] += 1
        self._take(total - hit)
        return Allocation(
            hashes=hashes, cached_blocks=hit, held=list(hashes[:hit]), committed=hit, private=total - hit
        )

    def _take(self, n: int) -> None:
        """Takes `n` blocks from the free pool, evicting least recently released cached blocks."""
        from_free = min(n, self._free)
        self._free -= from_free
        for _ in range(n - from_free):
            victim, _ = self._lru.popitem(last=False)
            del self._refs[victim]

    def commit(self, alloc: Allocation, computed_tokens: int) -> None:
        """Makes the request's full prompt blocks within `computed_tokens` cacheable."""
        upto = min(len(alloc.hashes), computed_tokens // self.block_size)
        refs = self._refs
        for i in range(alloc.committed, upto):
            h = alloc.hashes[i]
            if h in refs:
                continue  # computed twice at once: ours stays a private copy, as in vLLM
            refs[h] = 1
            alloc.held.append(h)
            alloc.private -= 1
        alloc.committed = max(alloc.committed, upto)

    def free(self, alloc: Allocation) -> None:
        """Releases a request's blocks: private ones become free, hashed ones cached (tail first, so
        they are evicted before the earlier blocks)."""
        refs = self._refs
        for h in reversed(alloc.held):
            left = refs[h] - 1
            refs[h] = left
            if left == 0:
                self._lru[h] = None
        self._free += alloc.private
        alloc.held = []
        alloc.private = 0

    def reset(self) -> None:
        """Drops every cached block. Only valid while no request holds blocks."""
        if self.used_blocks:
            raise RuntimeError("reset while blocks are in use")
        self._refs.clear()
        self._lru.clear()
        self._free = self.capacity
