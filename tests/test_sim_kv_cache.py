"""The simulator's paged KV cache: chained prefix hashes, reference counts, LRU eviction, capacity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmlb.sim.kv_cache import KVCache, block_hashes, root_hash

BS = 4  # tokens per block
CPT = 1  # bytes per token: block i is prompt[4i:4i+4]


def hashes(prompt: bytes, model: str = "m", adapter: str | None = None) -> list[bytes]:
    tokens = len(prompt) // CPT
    return block_hashes(prompt, root_hash(model, adapter), BS * CPT, tokens // BS)


def admit(cache: KVCache, prompt: bytes, output: int = 1, computed: bool = True, **kw: str | None):
    """Allocates `prompt` and, if `computed`, commits its whole prefill (as the engine does)."""
    alloc = cache.allocate(hashes(prompt, **kw), len(prompt), output)  # type: ignore[arg-type]
    assert alloc is not None
    if computed:
        cache.commit(alloc, len(prompt))
    return alloc


def test_a_shared_prefix_hits_only_its_full_blocks():
    cache = KVCache(capacity=100, block_size=BS)
    first = admit(cache, b"AAAABBBBCCCCxx")  # 3 full blocks + a partial one
    assert first.cached_blocks == 0
    cache.free(first)
    second = admit(cache, b"AAAABBBBZZZZyy")
    assert second.cached_blocks == 2
    assert cache.lookup(hashes(b"AAAABBBBCCCCDDDDe"), 17) == 3


def test_a_block_matches_only_after_the_same_earlier_blocks():
    cache = KVCache(capacity=100, block_size=BS)
    cache.free(admit(cache, b"AAAABBBBCCCCx"))
    # Same second and third blocks after a different first one: no hit at all.
    assert cache.lookup(hashes(b"QQQQBBBBCCCCx"), 13) == 0
    assert hashes(b"QQQQBBBB")[1] != hashes(b"AAAABBBB")[1]
    assert cache.lookup(hashes(b"AAAABBBBCCCCx"), 13) == 3


def test_the_partial_last_block_is_never_cached():
    cache = KVCache(capacity=100, block_size=BS)
    alloc = admit(cache, b"AAAABBB", output=1)  # 1 full block, 3 tokens of a second
    assert len(alloc.held) == 1
    cache.free(alloc)
    assert cache.cached_blocks == 1
    # A prompt extending the partial block reuses only the full one.
    assert cache.lookup(hashes(b"AAAABBBBC"), 9) == 1


def test_cached_tokens_never_cover_the_whole_prompt():
    cache = KVCache(capacity=100, block_size=BS)
    cache.free(admit(cache, b"AAAABBBB"))
    # The same 8-token prompt: both blocks are cached, but the last token must be computed.
    again = admit(cache, b"AAAABBBB")
    assert again.cached_blocks == 1
    assert cache.lookup(hashes(b"AAAABBBB"), 8) == 1
    assert cache.lookup(hashes(b"AAAABBBBC"), 9) == 2


def test_models_and_adapters_do_not_share_blocks():
    cache = KVCache(capacity=100, block_size=BS)
    cache.free(admit(cache, b"AAAABBBBx", model="m"))
    assert cache.lookup(hashes(b"AAAABBBBx", model="m"), 9) == 2
    assert cache.lookup(hashes(b"AAAABBBBx", model="other"), 9) == 0
    assert cache.lookup(hashes(b"AAAABBBBx", model="m", adapter="lora-a"), 9) == 0
    cache.free(admit(cache, b"AAAABBBBx", model="m", adapter="lora-a"))
    assert cache.lookup(hashes(b"AAAABBBBx", model="m", adapter="lora-a"), 9) == 2
    assert cache.lookup(hashes(b"AAAABBBBx", model="m", adapter="lora-b"), 9) == 0


def test_blocks_cover_prompt_and_output():
    cache = KVCache(capacity=100, block_size=BS)
    alloc = admit(cache, b"AAAABB", output=7, computed=False)  # 13 tokens -> 4 blocks
    assert cache.used_blocks == 4
    assert cache.usage == pytest.approx(0.04)
    cache.commit(alloc, 6)
    assert cache.used_blocks == 4  # committing moves a block into the hash table, takes none
    cache.free(alloc)
    assert cache.used_blocks == 0
    assert cache.cached_blocks == 1
    assert cache.free_blocks == 99


def test_finished_blocks_stay_cached_until_evicted_least_recently_used_first():
    cache = KVCache(capacity=6, block_size=BS)
    old = admit(cache, b"AAAAx", output=3)  # 2 blocks, 1 hashed
    new = admit(cache, b"BBBBx", output=3)
    cache.free(old)
    cache.free(new)
    assert cache.cached_blocks == 2
    assert cache.free_blocks == 4
    # Needs 5 blocks: the 4 free ones, then evicts the least recently released (AAAA).
    big = admit(cache, b"CCCCx", output=15, computed=False)
    assert cache.lookup(hashes(b"AAAAx"), 5) == 0
    assert cache.lookup(hashes(b"BBBBx"), 5) == 1
    cache.free(big)


def test_a_reused_block_moves_to_the_back_of_the_lru():
    cache = KVCache(capacity=6, block_size=BS)
    a = admit(cache, b"AAAAx", output=3)
    b = admit(cache, b"BBBBx", output=3)
    cache.free(a)
    cache.free(b)
    cache.free(admit(cache, b"AAAAy", output=3))  # AAAA hit and released again: now newest
    admit(cache, b"CCCCx", output=15, computed=False)  # evicts one cached block
    assert cache.lookup(hashes(b"AAAAx"), 5) == 1
    assert cache.lookup(hashes(b"BBBBx"), 5) == 0


def test_referenced_blocks_are_never_evicted():
    cache = KVCache(capacity=4, block_size=BS)
    running = admit(cache, b"AAAABBBBx", output=3)  # 3 blocks, 2 hashed and referenced
    assert cache.allocate(hashes(b"CCCCx"), 5, 4) is None  # needs 3, only 1 free
    assert cache.lookup(hashes(b"AAAABBBBx"), 9) == 2
    cache.free(running)
    assert cache.allocate(hashes(b"CCCCx"), 5, 4) is not None  # now evicts them


def test_a_hit_on_an_unreferenced_block_does_not_count_it_as_free():
    cache = KVCache(capacity=3, block_size=BS)
    cache.free(admit(cache, b"AAAABBBBx", output=3))  # 3 blocks; 2 cached, 1 free
    # Hits both cached blocks and needs 2 more: only 1 is free once the hits are referenced.
    assert cache.allocate(hashes(b"AAAABBBBy"), 9, 4) is None
    assert cache.lookup(hashes(b"AAAABBBBy"), 9) == 2  # the failed attempt evicted nothing
    assert cache.allocate(hashes(b"AAAABBBBy"), 9, 3) is not None


def test_a_request_larger_than_the_cache_never_fits():
    cache = KVCache(capacity=4, block_size=BS)
    assert cache.fits_ever(16)
    assert not cache.fits_ever(17)


def test_a_finished_request_loses_its_tail_blocks_first():
    cache = KVCache(capacity=4, block_size=BS)
    cache.free(admit(cache, b"AAAABBBBx", output=3))  # 3 blocks; AAAA and BBBB cached, 2 free
    admit(cache, b"CCCCx", output=7, computed=False)  # 3 blocks: 2 free, then evicts BBBB
    assert cache.lookup(hashes(b"AAAABBBBx"), 9) == 1


def test_evicting_a_parent_makes_its_descendants_unreachable():
    cache = KVCache(capacity=5, block_size=BS)
    # B computes AAAA too (a private duplicate) and caches BBBB on top of A's AAAA.
    a = admit(cache, b"AAAAx", output=3, computed=False)
    b = admit(cache, b"AAAABBBBx", output=3, computed=False)
    cache.commit(a, 5)
    cache.commit(b, 9)
    cache.free(a)
    admit(cache, b"CCCCx", output=3, computed=False)  # no block free: evicts AAAA
    bbbb = hashes(b"AAAABBBBx")[1]
    assert cache.contains(bbbb)
    assert cache.refcount(bbbb) == 1
    assert cache.lookup(hashes(b"AAAABBBBx"), 9) == 0  # BBBB is there but cannot be reached


def test_blocks_computed_twice_at_once_stay_private():
    cache = KVCache(capacity=10, block_size=BS)
    a = admit(cache, b"AAAAx", computed=False)
    b = admit(cache, b"AAAAx", computed=False)  # same prompt admitted before A computed it
    assert b.cached_blocks == 0
    cache.commit(a, 5)
    cache.commit(b, 5)
    assert cache.refcount(hashes(b"AAAAx")[0]) == 1
    assert b.held == []
    assert b.private == 2
    cache.free(a)
    cache.free(b)
    assert cache.used_blocks == 0
    assert cache.free_blocks + cache.cached_blocks == 10


def test_reset_drops_everything_but_not_while_in_use():
    cache = KVCache(capacity=10, block_size=BS)
    alloc = admit(cache, b"AAAAx")
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.free(alloc)
    cache.reset()
    assert cache.free_blocks == 10
    assert cache.lookup(hashes(b"AAAAx"), 5) == 0


def test_hashes_are_stable_across_processes():
    # blake2b, not hash(): the same prompt gives the same blocks in every sim process.
    code = (
        "from llmlb.sim.kv_cache import block_hashes, root_hash;"
        "print(block_hashes(b'abcdefgh', root_hash('m', 'a'), 4, 2)[1].hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {block_hashes(b"abcdefgh", root_hash("m", "a"), 4, 2)[1].hex()}
