"""The prefix-caching block pool against hand-computed plans and a stateful property test (no model)."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from types import SimpleNamespace

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence, SequenceStatus

A1 = SimpleNamespace(name="a", content_hash="1" * 64)
A1_REUPLOAD = SimpleNamespace(name="a", content_hash="1" * 64)  # another version object, same weights
A2 = SimpleNamespace(name="a", content_hash="2" * 64)  # the same name after a swap to new weights
B1 = SimpleNamespace(name="b", content_hash="1" * 64 + "0")


def seq(rid: str, tokens: list[int], adapter=None, salt=None, arrival: int = 0) -> Sequence:
    return Sequence(rid, arrival, list(tokens), len(tokens), SamplingParams(), adapter=adapter, cache_salt=salt)


def computed(pool: PrefixCachingBlockManager, s: Sequence) -> None:
    """Admit ``s`` whole, play the model over its tokens and publish its full blocks."""
    hit = pool.match(s)
    assert pool.admit(s, hit, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    pool.commit(s)


def test_hash_chain_is_blake2b_over_parent_key_and_tokens():
    pool = PrefixCachingBlockManager(8, 2)
    s = seq("a", [5, 6, 7, 8, 9])
    computed(pool, s)
    key = hashlib.blake2b(b"nlora-prefix-v1\x00base\x00", digest_size=32).digest()
    h0 = hashlib.blake2b(b"" + key + struct.pack("<2q", 5, 6), digest_size=32).digest()
    h1 = hashlib.blake2b(h0 + key + struct.pack("<2q", 7, 8), digest_size=32).digest()
    assert s.block_hashes == [h0, h1]


def test_hit_shares_blocks_and_recomputes_the_last_token():
    pool = PrefixCachingBlockManager(8, 4)
    first = seq("a", list(range(10)))
    computed(pool, first)  # blocks 0, 1 full and published; block 2 holds 2 tokens
    assert pool.num_cached_blocks == 2 and pool.num_used_blocks == 3
    second = seq("b", list(range(8)) + [99, 98])
    assert pool.match(second) == first.block_table[:2]
    assert pool.admit(second, pool.match(second), 10)
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2] and pool.num_used_blocks == 4
    assert [pool.ref_count(b) for b in first.block_table] == [2, 2, 1]
    exact = seq("c", list(range(8)))  # a whole-block prompt: its last block is recomputed
    assert pool.match(exact) == first.block_table[:1]
    assert (pool.num_queries, pool.num_hits) == (10 + 10, 0 + 8)


def test_adapters_salts_and_versions_never_share_but_a_reupload_does():
    pool = PrefixCachingBlockManager(32, 4)
    tokens = list(range(13))
    computed(pool, seq("a1", tokens, A1))
    assert pool.match(seq("base", tokens)) == []
    assert pool.match(seq("b1", tokens, B1)) == []
    assert pool.match(seq("a2", tokens, A2)) == []  # a swap to new weights never hits old blocks
    assert pool.match(seq("salted", tokens, A1, salt="tenant:x")) == []
    assert len(pool.match(seq("again", tokens, A1_REUPLOAD))) == 3  # same weights, same blocks
    computed(pool, seq("x", tokens, A1, salt="tenant:x"))
    assert len(pool.match(seq("x2", tokens, A1, salt="tenant:x"))) == 3
    assert pool.match(seq("y", tokens, A1, salt="tenant:y")) == []


def test_lru_evicts_the_oldest_free_cached_block_and_unhashed_blocks_go_first():
    pool = PrefixCachingBlockManager(4, 2)
    old, new = seq("old", [1, 2, 3]), seq("new", [7, 8, 9])
    computed(pool, old)  # block 0 published, block 1 partial
    computed(pool, new)  # block 2 published, block 3 partial
    pool.free(old.block_table)
    pool.free(new.block_table)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    grab = []
    pool.grow(grab, 6)  # the two partial blocks first, then the older cached block
    assert grab == [3, 1, 0] and pool.num_cached_blocks == 1
    assert pool.match(seq("n", [7, 8, 9])) == [2] and pool.match(seq("o", [1, 2, 3])) == []


def test_blocks_short_admits_nothing_and_a_double_free_raises():
    pool = PrefixCachingBlockManager(3, 2)
    s = seq("a", [1, 2, 3, 4, 5])
    computed(pool, s)
    other = seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hit = pool.match(other)
    assert hit == s.block_table[:2]
    assert not pool.admit(other, hit, 9)  # needs 3 fresh blocks, 0 free
    assert other.block_table == [] and other.num_computed_tokens == 0 and pool.ref_count(hit[0]) == 1
    table = list(s.block_table)
    pool.free(s.block_table)
    try:
        pool.free(table)
    except RuntimeError as exc:
        assert "freed twice" in str(exc)
    else:
        raise AssertionError("double free went unnoticed")


class PoolMachine(RuleBasedStateMachine):
    """Random admit / step / finish / abort / preempt / evict on the scheduler over a small pool,
    fcfs (one LRU) or fair (tenants share the cache by weight), several tenants sharing or not;
    after every rule the pool's counts equal a recount from the live block tables, and with fair
    every evicted block came from a tenant with the most cached blocks per unit of weight."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(12, 24),
                weights=st.sampled_from([None, {}, {"x": 3.0}, {"x": 1.0, "y": 2.0, None: 0.5}]))
    def setup(self, block_size, num_blocks, weights):
        self.weights = weights
        self.pool = PrefixCachingBlockManager(num_blocks, block_size, tenant_weights=weights)
        config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=12 * block_size,
                                 policy="fcfs" if weights is None else "fair", tenant_weights=weights or {})
        self.sched = Scheduler(config, self.pool)
        self.arrivals = 0
        self.live: list[Sequence] = []

    @rule(prefix=st.integers(0, 3), length=st.integers(1, 10), adapter=st.sampled_from([None, A1, A2]),
          tenant=st.sampled_from([None, "x", "y", "z"]), salted=st.booleans())
    def admit(self, prefix, length, adapter, tenant, salted):
        tokens = ([7] * 4 + [prefix] * 4 + list(range(length)))[: 4 + length]  # many share a prefix
        # salted: the tenant's own sharing group (keys configured); else shared by all tenants
        s = Sequence(f"r{self.arrivals}", self.arrivals, tokens, len(tokens), SamplingParams(), tenant=tenant,
                     adapter=adapter, cache_salt=f"tenant:{tenant}" if salted else None)
        self.arrivals += 1
        self.sched.add(s)
        self.live.append(s)

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        batch = self.sched.schedule()
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(3)
        for s in list(self.live):  # a sequence that reached its length limit finishes
            if s.num_tokens >= 12 * self.pool.block_size - 1:
                self._end(s)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish_or_abort(self, i):
        self._end(self.live[i % len(self.live)])  # running: finish; waiting: abort

    @precondition(lambda self: self.sched.running)
    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        self.sched._preempt(self.sched.running[i % len(self.sched.running)])

    @rule(n=st.integers(1, 6))
    def evict(self, n):
        """Someone else takes free blocks (evicting cached ones), one at a time, and gives them back.
        With fair, each comes from an uncached free block while there is one, else from a tenant
        occupying the most blocks (held, or free and cached: recounted here) per unit of weight
        among those with a free cached one."""
        pool, table = self.pool, []
        for _ in range(min(n, pool.num_free_blocks)):
            free = {b: (pool._hash[b] is not None, pool.owner(b)) for b in range(pool.num_blocks)
                    if pool.ref_count(b) == 0}
            count = self._occupied()
            pool.grow(table, (len(table) + 1) * pool.block_size)
            hashed, owner = free[table[-1]]
            if self.weights is not None:
                ratio = {t: count[t] / self.weights.get(t, 1.0) for cached, t in free.values() if cached}
                if not all(cached for cached, _ in free.values()):
                    assert not hashed  # uncached free blocks go first
                else:
                    assert ratio[owner] == max(ratio.values())
        pool.free(table)

    def _end(self, s):
        self.sched.finish(s)
        self.live.remove(s)

    @invariant()
    def counts_are_exact(self):
        if not hasattr(self, "pool"):
            return
        holders = [0] * self.pool.num_blocks
        for s in self.live:
            if s.status is SequenceStatus.RUNNING:
                for b in s.block_table:
                    holders[b] += 1
            else:
                assert s.block_table == [] and s.num_computed_tokens == 0
        assert holders == [self.pool.ref_count(b) for b in range(self.pool.num_blocks)]
        assert self.pool.num_used_blocks == sum(1 for h in holders if h)
        assert self.pool.num_free_blocks + self.pool.num_used_blocks == self.pool.num_blocks
        if self.pool.shares is not None:
            assert self.pool.shares.num_blocks == self._occupied()
            # a salted sequence (keys configured) shares blocks within its tenant only: it owns them all
            for s in self.live:
                if s.cache_salt is not None and s.status is SequenceStatus.RUNNING:
                    assert {self.pool.owner(b) for b in s.block_table} <= {s.tenant}

    def _occupied(self) -> Counter:
        """Blocks each tenant occupies, recounted from the blocks' owners: held, or free and cached."""
        pool = self.pool
        return Counter(pool.owner(b) for b in range(pool.num_blocks) if pool.ref_count(b) or pool._hash[b] is not None)

    @invariant()
    def shared_blocks_hold_the_same_chain(self):
        if not hasattr(self, "pool"):
            return
        owner: dict[int, bytes] = {}
        for s in self.live:
            tokens_by_block = {}
            for i, b in enumerate(s.block_table[: s.num_computed_tokens // self.pool.block_size]):
                tokens_by_block[b] = (s.adapter and s.adapter.content_hash, s.cache_salt,
                                      tuple(s.token_ids[: (i + 1) * self.pool.block_size]))
            for b, what in tokens_by_block.items():
                # a block two sequences hold was computed for the same adapter, salt and tokens
                assert owner.setdefault(b, what) == what


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
