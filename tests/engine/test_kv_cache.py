"""KVCacheManager: allocation, ref counts, prefix hashing, LRU eviction — pure Python."""

from __future__ import annotations

import pytest

from tokenmill.engine.kv_cache import KVCacheManager


def test_allocate_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate("a", 9)  # 3 blocks
    assert kv.allocate("b", 4)  # 1 block
    assert kv.num_free_blocks == 6 and len(kv.block_ids("a")) == 3
    assert kv.allocate("a", 13)  # grows to 4 blocks, keeps the first 3
    assert len(kv.block_ids("a")) == 4
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 10 and kv.usage == 0.0


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate("a", 12)
    assert not kv.allocate("b", 8)
    assert kv.num_free_blocks == 1
    assert kv.allocate("b", 4)


def test_prefix_hit_after_free_and_last_token_never_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 112))  # exactly 3 full blocks
    assert kv.allocate("a", len(tokens))
    kv.cache_computed("a", tokens, len(tokens))
    kv.free("a")
    # The last token must be recomputed for its logits, so only 2 of the 3 blocks are hits.
    hit = kv.find_cached_prefix("b", tokens)
    assert len(hit) == 2
    assert kv.allocate("b", len(tokens), hit)
    assert kv.block_ids("b")[:2] == hit
    # A longer prompt with the same prefix hits all 3.
    longer = tokens + [7, 8]
    assert len(kv.find_cached_prefix("c", longer)) == 3


def test_shared_blocks_are_ref_counted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    assert kv.allocate("a", 9)
    kv.cache_computed("a", tokens, 9)
    hit = kv.find_cached_prefix("b", tokens)
    assert kv.allocate("b", 9, hit)
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    free_before = kv.num_free_blocks
    kv.free("a")
    assert kv.num_free_blocks == free_before + 1  # only a's private last block; shared ones still held by b
    kv.free("b")
    assert kv.num_free_blocks == 8


def test_different_prefix_same_block_tokens_does_not_hit():
    """The hash chain includes the parent: equal tokens after a different prefix are not a hit."""
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = [1, 2, 3, 4, 5]
    assert kv.allocate("a", 5)
    kv.cache_computed("a", a, 5)
    kv.free("a")
    assert kv.find_cached_prefix("b", [9, 9, 3, 4, 5]) == []


def test_lru_evicts_least_recently_freed_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    x, y = [1, 2, 3, 4, 0], [5, 6, 7, 8, 0]
    for rid, toks in (("x", x), ("y", y)):
        assert kv.allocate(rid, 4)
        kv.cache_computed(rid, toks, 4)
    kv.free("x")
    kv.free("y")
    # Need 1 block: evicts x's *tail* block (freed first, tail-first), x's first block survives.
    assert kv.allocate("z", 2)
    assert len(kv.find_cached_prefix("q", x)) == 1
    assert len(kv.find_cached_prefix("q2", y)) == 2


def test_cached_free_blocks_are_not_double_counted():
    """A hit on a cached block sitting in the free queue takes it out of the queue."""
    kv = KVCacheManager(num_blocks=3, block_size=2)
    toks = [1, 2, 3, 4, 5]
    assert kv.allocate("a", 4)
    kv.cache_computed("a", toks, 4)
    kv.free("a")
    hit = kv.find_cached_prefix("b", toks)
    assert len(hit) == 2
    assert not kv.allocate("b", 8, hit)  # needs 2 more blocks but only 1 is truly free
    assert kv.allocate("b", 6, hit)
    assert kv.num_free_blocks == 0


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    assert kv.allocate("a", 4)
    kv.cache_computed("a", [1, 2, 3, 4], 4)
    kv.free("a")
    assert kv.find_cached_prefix("b", [1, 2, 3, 4, 5]) == []


def test_bad_sizes():
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=16)
