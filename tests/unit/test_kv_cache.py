"""The paged KV block allocator and its prefix cache (rank 0 accounting, no tensors)."""
from __future__ import annotations

import pytest

from meshlm.config import CacheConfig
from meshlm.engine.kv_cache import KVCacheManager, hash_block, num_blocks_for
from meshlm.engine.request import Request
from meshlm.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, list(tokens), SamplingParams())


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """What a step does for one request: allocate, compute ``num_tokens``, cache full blocks."""
    kv.allocate(request, num_tokens)
    request.num_computed_tokens += num_tokens
    kv.cache_full_blocks(request)


def free_block_count_by_refs(kv: KVCacheManager) -> int:
    return sum(kv.ref_count(b) == 0 for b in range(kv.num_blocks))


# ---- allocator -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, block_size, expected", [
    (0, 16, 0), (1, 16, 1), (15, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2), (33, 16, 3),
    (1, 1, 1), (5, 1, 5),
])
def test_num_blocks_for(num_tokens, block_size, expected):
    assert num_blocks_for(num_tokens, block_size) == expected


def test_block_size_must_be_power_of_two():
    with pytest.raises(ValueError, match="block_size=12"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match="block_size=12"):
        KVCacheManager(num_blocks=8, block_size=12)
    with pytest.raises(ValueError, match="num_blocks=0"):
        KVCacheManager(num_blocks=0, block_size=16)
    assert CacheConfig(block_size=32).block_size == 32


def test_allocate_free_usage():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    req = make_request("a", range(10))
    kv.allocate(req, 10)  # ceil(10 / 4) = 3 blocks
    assert len(req.block_ids) == 3 and len(set(req.block_ids)) == 3
    assert kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    assert all(kv.ref_count(b) == 1 for b in req.block_ids)
    req.num_computed_tokens = 10
    kv.allocate(req, 2)  # 12 tokens still fit in 3 blocks
    assert len(req.block_ids) == 3
    kv.allocate(req, 3)  # 13 tokens need a 4th
    assert len(req.block_ids) == 4 and kv.num_free_blocks == 4
    kv.free(req)
    assert req.block_ids == [] and kv.num_free_blocks == 8 and kv.usage == 0.0
    assert free_block_count_by_refs(kv) == 8


def test_block_boundaries():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    req = make_request("a", range(4))
    assert kv.num_new_blocks(req, 4) == 1
    assert kv.num_new_blocks(req, 5) == 2
    kv.allocate(req, 4)
    req.num_computed_tokens = 4
    assert kv.num_new_blocks(req, 0) == 0
    assert kv.num_new_blocks(req, 1) == 1  # token 5 starts block 2
    assert kv.num_new_blocks(req, 4) == 1
    assert kv.num_new_blocks(req, 5) == 2


def test_requests_get_disjoint_blocks_and_allocation_fails_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b, c = make_request("a", range(8)), make_request("b", range(50, 58)), make_request("c", [1])
    kv.allocate(a, 8)
    assert kv.can_allocate(b, 8)
    kv.allocate(b, 8)
    assert set(a.block_ids).isdisjoint(b.block_ids)
    assert sorted(a.block_ids + b.block_ids) == [0, 1, 2, 3]
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert not kv.can_allocate(c, 1)
    with pytest.raises(RuntimeError, match="only 0 of 4"):
        kv.allocate(c, 1)
    kv.free(a)
    assert kv.can_allocate(c, 1)


def test_try_allocate_changes_nothing_when_short_and_copies_a_shared_block_it_writes():
    """try_allocate: False with nothing taken when the pool is short (a copy-on-write block
    counted), else the same table as allocate, the shared block written into swapped for a copy."""
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    parent, child = make_request("p", range(6)), make_request("c", range(6))
    kv.allocate(parent, 6)  # blocks for tokens 0-3 and 4-5 (the second partly filled)
    parent.num_computed_tokens = 6
    kv.fork(parent, child)
    child.num_computed_tokens = 6
    shared = list(child.block_ids)
    assert kv.num_new_blocks(child, 1) == 1  # token 6 goes into the shared partial block: a copy
    other = make_request("o", range(8))
    kv.allocate(other, 8)  # the pool is now full
    assert not kv.try_allocate(child, 1)
    assert child.block_ids == shared and kv.num_free_blocks == 0 and kv.take_block_copies() == []
    kv.free(other)
    assert kv.try_allocate(child, 3)  # tokens 6-8: a copy of the partial block, then one new block
    assert child.block_ids[0] == shared[0] and child.block_ids[1] not in shared and len(child.block_ids) == 3
    assert kv.take_block_copies() == [(shared[1], child.block_ids[1])]
    assert kv.ref_count(shared[1]) == 1 and kv.ref_count(shared[0]) == 2
    assert kv.try_allocate(child, 3) and len(child.block_ids) == 3  # already held: nothing more


def test_free_twice_is_harmless_for_an_empty_table():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", range(3))
    kv.allocate(req, 3)
    kv.free(req)
    kv.free(req)  # the table is empty now: nothing to release
    assert kv.num_free_blocks == 2


# ---- prefix caching ----------------------------------------------------------------------------

SHARED = list(range(100, 112))  # 3 full blocks of 4


def test_hash_block_chains_parent():
    first = hash_block(None, [1, 2, 3, 4])
    assert first == hash_block(None, [1, 2, 3, 4])
    assert first != hash_block(None, [1, 2, 3, 5])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])


def test_shared_prefix_blocks_are_ref_counted():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", SHARED + [1, 2])  # 14 tokens: 3 full blocks + 2
    assert kv.get_computed_prefix(a) == 0
    compute(kv, a, 14)
    assert kv.num_cached_blocks == 3
    b = make_request("b", SHARED + [7])  # 13 tokens
    assert kv.get_computed_prefix(b) == 12
    assert b.num_computed_tokens == 12 and b.num_cached_prompt_tokens == 12
    assert b.block_ids == a.block_ids[:3]
    assert [kv.ref_count(x) for x in a.block_ids] == [2, 2, 2, 1]
    assert kv.num_free_blocks == 16 - 4  # sharing took no new block
    compute(kv, b, 1)  # its own 4th block
    assert len(b.block_ids) == 4 and b.block_ids[3] != a.block_ids[3]
    assert kv.ref_count(b.block_ids[3]) == 1
    kv.free(a)
    assert [kv.ref_count(x) for x in b.block_ids] == [1, 1, 1, 1]
    kv.free(b)
    assert kv.num_free_blocks == 16 and free_block_count_by_refs(kv) == 16


@pytest.mark.parametrize("num_tokens, expected", [(12, 8), (13, 12), (11, 8), (9, 8), (8, 4), (5, 4), (4, 0)])
def test_at_least_one_token_is_left_to_compute(num_tokens, expected):
    # Whole cached blocks only, and never the last token: floor((num_tokens - 1) / 4) * 4.
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", SHARED + [1])
    compute(kv, a, 13)
    b = make_request("b", (SHARED + [1])[:num_tokens])
    assert kv.get_computed_prefix(b) == expected
    assert b.num_uncomputed_tokens >= 1


def test_divergent_suffix_does_not_share():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", SHARED + [1])
    compute(kv, a, 13)
    diverges_in_block_3 = make_request("b", SHARED[:8] + [0, 0, 0, 0, 1])
    assert kv.get_computed_prefix(diverges_in_block_3) == 8
    assert diverges_in_block_3.block_ids == a.block_ids[:2]
    diverges_at_token_0 = make_request("c", [0] + SHARED[1:] + [1])
    assert kv.get_computed_prefix(diverges_at_token_0) == 0
    assert diverges_at_token_0.block_ids == []


def test_equal_block_after_a_different_prefix_is_not_shared():
    # Keys chain the whole prefix: block [5..8] after [1..4] is not block [5..8] after [9..12].
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    compute(kv, a, 9)
    b = make_request("b", [9, 10, 11, 12, 0])
    compute(kv, b, 5)  # caches block [9..12]
    c = make_request("c", [9, 10, 11, 12, 5, 6, 7, 8, 0])
    assert kv.get_computed_prefix(c) == 4
    assert c.block_ids == b.block_ids[:1]


def test_freed_block_is_found_again():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", SHARED + [1, 2])
    compute(kv, a, 14)
    cached_ids = a.block_ids[:3]
    kv.free(a)
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 3
    again = make_request("a2", SHARED + [1, 2])
    assert kv.get_computed_prefix(again) == 12
    assert again.block_ids == cached_ids
    assert [kv.ref_count(x) for x in cached_ids] == [1, 1, 1]
    assert kv.num_free_blocks == 8 - 3


def test_cached_free_blocks_are_evicted_when_the_pool_is_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(16)) + [99])
    kv.get_computed_prefix(a)
    compute(kv, a, 16)  # all 4 blocks full and cached
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.num_cached_blocks == 4
    b = make_request("b", list(range(50, 66)))
    assert kv.get_computed_prefix(b) == 0
    assert kv.can_allocate(b, 16)
    kv.allocate(b, 16)  # evicts every cached block
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 0
    kv.free(b)  # b computed nothing: its blocks are plain free blocks
    a2 = make_request("a2", list(range(16)) + [99])
    assert kv.get_computed_prefix(a2) == 0


def test_uncached_free_blocks_go_first_then_least_recently_freed():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(9)))
    compute(kv, a, 9)  # blocks a0, a1 full and cached; a2 partial
    a0, a1, a2 = a.block_ids
    kv.free(a)  # released tail first: a2 (plain), a1 (cached), a0 (cached)
    b = make_request("b", list(range(50, 58)))
    kv.allocate(b, 8)  # two blocks: the never-used one and a2, no eviction
    assert sorted(b.block_ids) == sorted({0, 1, 2, 3} - {a0, a1})
    assert kv.num_cached_blocks == 2
    c = make_request("c", [77])
    kv.allocate(c, 1)  # must evict: a1 was freed before a0, so it goes first
    assert c.block_ids == [a1]
    again = make_request("a2", list(range(9)))
    assert kv.get_computed_prefix(again) == 4
    assert again.block_ids == [a0]


def test_held_cached_blocks_are_never_evicted():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", list(range(9)))
    compute(kv, a, 9)  # holds all 3 blocks, 2 of them cached
    b = make_request("b", [5])
    assert kv.num_free_blocks == 0 and not kv.can_allocate(b, 1)
    shared = make_request("s", list(range(8)) + [1])
    assert kv.get_computed_prefix(shared) == 8  # sharing is fine without free blocks
    assert [kv.ref_count(x) for x in a.block_ids] == [2, 2, 1]


def test_blocks_filled_by_decoding_are_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", [1, 2, 3])
    compute(kv, a, 3)
    assert kv.num_cached_blocks == 0
    a.output_token_ids.append(4)
    compute(kv, a, 1)  # the decode of token 4 fills block 0
    assert kv.num_cached_blocks == 1
    a.output_token_ids.append(5)
    b = make_request("b", [1, 2, 3, 4, 9])
    assert kv.get_computed_prefix(b) == 4
    assert b.block_ids == a.block_ids[:1]


def test_two_requests_computing_the_same_block_keep_one_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a", SHARED[:4] + [1]), make_request("b", SHARED[:4] + [2])
    compute(kv, a, 5)
    kv.allocate(b, 5)  # b was admitted before a's block was cached, so it computes its own
    b.num_computed_tokens = 5
    kv.cache_full_blocks(b)
    assert kv.num_cached_blocks == 1
    c = make_request("c", SHARED[:4] + [3])
    assert kv.get_computed_prefix(c) == 4 and c.block_ids == a.block_ids[:1]
    for r in (a, b, c):
        kv.free(r)
    assert kv.num_free_blocks == 8 and free_block_count_by_refs(kv) == 8


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", SHARED + [1])
    compute(kv, a, 13)
    held = make_request("held", SHARED[:4] + [1])
    compute(kv, held, 5)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.num_free_blocks == 8 - 2
    b = make_request("b", SHARED + [1])
    assert kv.get_computed_prefix(b) == 0
    kv.free(held)
    assert kv.num_free_blocks == 8


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", SHARED + [1])
    compute(kv, a, 13)
    assert kv.num_cached_blocks == 0
    b = make_request("b", SHARED + [1])
    assert kv.get_computed_prefix(b) == 0 and b.block_ids == []


def test_block_table_rows_grow_each_dimension_only_as_needed():
    """A sequence whose table grows by a block a step for 300 steps: BlockTableRows holds as many
    rows as slots and at most twice the widest table, and gives the table each step."""
    from meshlm.engine.plan_builder import BlockTableRows
    rows = BlockTableRows()
    a, b = make_request("a", [1]), make_request("b", [2])
    for step in range(300):
        a.block_ids.append(step + 1)
        b.block_ids.append(1000 + step)
        tables = rows.tables([a, b], [0, 1])
        assert tables.tolist() == [a.block_ids, b.block_ids]
    assert rows.rows.shape[0] <= 2 and 300 <= rows.rows.shape[1] <= 600, rows.rows.shape
