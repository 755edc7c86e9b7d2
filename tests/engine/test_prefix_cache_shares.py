"""Fair eviction of cached KV blocks across tenants (cache_shares.py) against hand traces (no model).

Every trace: tenants publish prompts of whole blocks (block_size 2) and free them, so all their blocks
are cached and free, the last block of each prompt first in its LRU; then a grow takes blocks and
the test compares the blocks taken, in order, with the order worked out by hand.
"""

from __future__ import annotations

from collections import OrderedDict

from nlora_serve.engine.scheduling.cache_shares import CacheShares
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence


def seq(tenant: str | None, tokens: list[int]) -> Sequence:
    return Sequence(f"{tenant}-{tokens[0]}", 0, list(tokens), len(tokens), SamplingParams(), tenant=tenant,
                    cache_salt=None if tenant is None else f"tenant:{tenant}")


def published(pool: PrefixCachingBlockManager, tenant: str | None, first: int, num_blocks: int,
              keep: bool = False) -> Sequence:
    """``tenant`` computes a prompt of ``num_blocks`` whole blocks (tokens ``first``, ``first`` + 1, ...)
    and, unless ``keep``, finishes: its blocks stay cached, free."""
    s = seq(tenant, list(range(first, first + num_blocks * pool.block_size)))
    assert pool.admit(s, pool.match(s), s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    pool.commit(s)
    if not keep:
        pool.free(s.block_table)
    return s


def cached_blocks(pool: PrefixCachingBlockManager, tenant: str | None, first: int, num_blocks: int) -> int:
    """Blocks of that prompt still found (one more token asked, so every block of it may match)."""
    return len(pool.match(seq(tenant, list(range(first, first + num_blocks * pool.block_size)) + [0])))


def grab(pool: PrefixCachingBlockManager, n: int) -> list[int]:
    table: list[int] = []
    pool.grow(table, n * pool.block_size)
    return table


def test_fcfs_keeps_one_lru_across_tenants():
    pool = PrefixCachingBlockManager(10, 2)  # tenant_weights None: the fcfs pool
    published(pool, "a", 100, 3)  # blocks 0, 1, 2; LRU 2, 1, 0
    published(pool, "b", 200, 5)  # blocks 3..7; LRU 7, 6, 5, 4, 3 after a's
    # the never-used blocks 8, 9 first, then the server-wide LRU: all of a's before b's
    assert grab(pool, 6) == [8, 9, 2, 1, 0, 7]
    assert (cached_blocks(pool, "a", 100, 3), cached_blocks(pool, "b", 200, 5)) == (0, 4)


def test_equal_weights_take_from_the_tenant_with_more_cached_blocks():
    pool = PrefixCachingBlockManager(10, 2, tenant_weights={})
    published(pool, "a", 100, 3)  # blocks 0, 1, 2: LRU 2, 1, 0 (freed first: older)
    published(pool, "b", 200, 5)  # blocks 3..7: LRU 7, 6, 5, 4, 3
    # 8, 9 (never used); then a:b = 3:5 -> b's 7; 3:4 -> b's 6; 3:3, a's oldest block is older -> a's 2;
    # 2:3 -> b's 5. Left: a 2, b 2
    assert grab(pool, 6) == [8, 9, 7, 6, 2, 5]
    assert pool.shares.num_blocks == {"a": 2, "b": 2, None: 6}  # None: grab's
    assert (cached_blocks(pool, "a", 100, 3), cached_blocks(pool, "b", 200, 5)) == (2, 2)


def test_weights_three_to_one_give_the_heavier_weight_three_times_the_blocks():
    pool = PrefixCachingBlockManager(10, 2, tenant_weights={"a": 3.0})  # b absent: weight 1
    published(pool, "a", 100, 6)  # blocks 0..5: LRU 5, 4, 3, 2, 1, 0
    published(pool, "b", 200, 3)  # blocks 6, 7, 8: LRU 8, 7, 6
    # 9 (never used); then per unit of weight a:b = 6/3:3 -> b's 8; 2:2, a's oldest block is older
    # -> a's 5; 5/3:2 -> b's 7; 5/3:1 -> a's 4; 4/3:1 -> a's 3. Left: a 3, b 1, their weights' ratio
    assert grab(pool, 6) == [9, 8, 5, 7, 4, 3]
    assert pool.shares.num_blocks == {"a": 3, "b": 1, None: 6}
    assert grab(pool, 2) == [2, 6]  # 1:1, a's oldest older -> a's 2; 2/3:1 -> b's 6
    assert (cached_blocks(pool, "a", 100, 6), cached_blocks(pool, "b", 200, 3)) == (2, 0)


def test_a_tenant_alone_keeps_the_whole_cache_in_lru_order():
    pool = PrefixCachingBlockManager(8, 2, tenant_weights={"a": 1.0, "b": 5.0})
    for k in range(4):
        published(pool, "a", 100 * (k + 1), 2)  # prompt k in blocks 2k, 2k + 1
    assert pool.num_cached_blocks == 8 == pool.num_free_blocks  # b weighs more, but it is absent
    assert [cached_blocks(pool, "a", 100 * (k + 1), 2) for k in range(4)] == [2, 2, 2, 2]
    assert grab(pool, 3) == [1, 0, 3]  # prompt 0 (oldest), then prompt 1's last block
    assert [cached_blocks(pool, "a", 100 * (k + 1), 2) for k in range(4)] == [0, 1, 2, 2]


def test_held_blocks_count_against_the_share():
    pool = PrefixCachingBlockManager(8, 2, tenant_weights={})
    published(pool, "b", 200, 2)  # blocks 0, 1: b's idle prefix, free
    heavy = published(pool, "a", 100, 4, keep=True)  # blocks 2..5 held by a's running request
    published(pool, "a", 300, 1)  # block 6: a's one free block
    # a occupies 5 blocks (4 held), b 2: a's free block goes before b's, though b has more free
    assert grab(pool, 2) == [7, 6]
    assert grab(pool, 1) == [1]  # a has no free block left: b's LRU
    assert heavy.block_table == [2, 3, 4, 5] and pool.shares.num_blocks == {"a": 4, "b": 1, None: 3}


def test_blocks_a_tenant_is_taking_count_before_they_are_cached():
    pool = PrefixCachingBlockManager(8, 2, tenant_weights={})
    published(pool, "b", 200, 3)  # blocks 0, 1, 2: b's idle prefix, free; LRU 2, 1, 0
    published(pool, "a", 100, 3)  # blocks 3, 4, 5: a's, free; LRU 5, 4, 3
    s = seq("a", list(range(300, 310)))  # a's new prompt: 5 blocks, none cached yet
    assert pool.admit(s, pool.match(s), s.num_tokens)
    # 6, 7 never used (a: 3 + 2 = 5 occupied), then a's own 5, 4, 3: b keeps its whole prefix
    assert s.block_table == [6, 7, 5, 4, 3] and cached_blocks(pool, "b", 200, 3) == 3
    assert pool.shares.num_blocks == {"a": 5, "b": 3}
    pool.free(s.block_table)  # nothing of it was computed: its blocks leave the count
    assert pool.shares.num_blocks == {"b": 3}


def test_a_hit_from_another_tenant_moves_the_block_to_it():
    pool = PrefixCachingBlockManager(6, 2, tenant_weights={})
    published(pool, None, 100, 2)  # blocks 0, 1, unsalted: any tenant may hit them (no keys configured)
    assert pool.shares.num_blocks == {None: 2}
    s = Sequence("b1", 1, list(range(100, 104)) + [9], 5, SamplingParams(), tenant="b")
    assert pool.admit(s, pool.match(s), s.num_tokens) and s.block_table[:2] == [0, 1]
    assert [pool.owner(b) for b in (0, 1, 2)] == ["b"] * 3 and pool.shares.num_blocks == {"b": 3}


def test_the_victim_heap_stays_small_under_churn():
    shares = CacheShares({"a": 2.0})
    free = {"a": OrderedDict.fromkeys([0]), "b": OrderedDict.fromkeys([1])}
    stamps = [0, 1]
    for _ in range(1000):
        shares.add("a", 1)
        shares.add("b", 1)
        shares.victim(free, stamps)
    assert len(shares._heap) <= 2 * 2 + 64  # stale keys are dropped, not kept for ever
    assert shares.victim(free, stamps) == "b"  # 1000 / 1 above 1000 / 2
