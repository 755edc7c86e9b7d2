"""Which tenant gives up a cached KV block: the one furthest above its weighted share of the cache.

With one server-wide LRU a tenant streaming distinct prompts evicts everyone's cached prefixes: a
light tenant's system prompt (1,680 tokens) went from cached to 0, its TTFT from 1.16 to 3.98 s.
With fair scheduling (``--scheduling-policy fair``) the KV cache is shared like the slots: the blocks
a tenant occupies count against ``w / Σw`` of them, and a cached block to reclaim comes from the
tenant that occupies the most blocks per unit of weight, ``num_blocks[t] / w[t]`` (its least
recently used free cached block). Repeated, that is weighted max-min fairness (what water-filling
reaches; "Fairness in Serving Large Language Models", Sheng et al., OSDI 2024, shares service
so): a tenant below its share is evicted from only once every tenant above it has come down to its
level or has no free cached block left to give; a tenant alone keeps the whole cache.

A tenant occupies the blocks its running requests hold (a block belongs to the tenant of the
request that took it, or that hit it last) and its free cached ones. Only free cached blocks can go,
but the others are its footprint too. Counting cached blocks only, a light tenant's idle system
prompt went first: counting free ones, against a heavy tenant whose running requests hold most of
the cache (fewer free blocks left than the prompt has); counting held cached ones too, against a
heavy tenant whose new prompt is taking blocks (not cached until computed: the churn case of
tests/engine/test_prefix_cache_engine.py kept 28 of its 36 cached prompt tokens so, all 36 when
every block occupied counts).

Ties (equal count per weight) go to the tenant whose oldest free block is the oldest: the global LRU
order among equals. The choice costs O(log tenants): a heap of (−count / weight, age of the oldest
free block) keys, refreshed lazily for the tenants whose key changed since the last choice.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Mapping


class CacheShares:
    """Per-tenant counts of blocks occupied and the choice of the tenant to evict from.

    Args:
        weights: tenant -> weight (> 0; a tenant absent here weighs 1): the scheduler's
            ``tenant_weights``, so a tenant's share of the cache is its share of the service.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)
        self.num_blocks: dict[str | None, int] = {}  # tenant -> blocks it occupies (held, or free and cached)
        self._key: dict[str | None, tuple[float, int]] = {}  # tenant -> its key as pushed last
        self._heap: list[tuple[float, int, int, str | None]] = []  # (key..., tie counter, tenant); stale ones too
        self._dirty: set[str | None] = set()  # tenants whose key may have changed since the last victim()
        self._order = itertools.count()  # heap entries never compare tenants (None vs str)

    def add(self, tenant: str | None, n: int) -> None:
        """``tenant`` occupies ``n`` blocks more (a block taken, hit from another tenant) or fewer
        (freed uncached, evicted, hit by another tenant)."""
        count = self.num_blocks.get(tenant, 0) + n
        if count:
            self.num_blocks[tenant] = count
        else:
            del self.num_blocks[tenant]
        self._dirty.add(tenant)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """New weights (a tenants-file reload): every tenant's eviction key is computed afresh."""
        self.weights = dict(weights)
        self._dirty.update(self._key)

    def touch(self, tenant: str | None) -> None:
        """``tenant``'s oldest free cached block may have changed (one freed, hit or evicted)."""
        self._dirty.add(tenant)

    def victim(self, free: Mapping[str | None, OrderedDict[int, None]], stamps: list[int]) -> str | None:
        """The tenant to take a free cached block from: the most blocks occupied per unit of weight
        among those with a free cached one, then the oldest free cached block.

        Args:
            free: tenant -> its free cached blocks, least recently used first (none empty, at least one).
            stamps: block -> when it was last freed (a counter).
        """
        for tenant in self._dirty:
            lru = free.get(tenant)
            if lru is None:
                self._key.pop(tenant, None)
                continue
            key = (-self.num_blocks[tenant] / self.weights.get(tenant, 1.0), stamps[next(iter(lru))])
            if self._key.get(tenant) != key:
                self._key[tenant] = key
                heapq.heappush(self._heap, (*key, next(self._order), tenant))
        self._dirty.clear()
        if len(self._heap) > 2 * len(self._key) + 64:  # stale entries: rebuild, amortized O(1) per push
            self._heap = [(*key, next(self._order), t) for t, key in self._key.items()]
            heapq.heapify(self._heap)
        heap = self._heap
        while self._key.get(heap[0][3]) != heap[0][:2]:
            heapq.heappop(heap)
        return heap[0][3]
