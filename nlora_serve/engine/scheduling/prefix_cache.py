"""Prefix caching: full KV blocks shared between requests, keyed by adapter (DESIGN §5).

A full block is named by a hash chain, as vLLM's automatic prefix caching does::

    h[i] = blake2b(h[i-1] || key || token ids of block i)     h[-1] = b""
    key  = blake2b(adapter version content hash, or "base" || cache salt)

so a block computed under one adapter is never reused under another (the adapter's content hash
is in every link: two adapters that share a name but not their weights never meet, vLLM #30931),
a hot-swap or reload with new weights never hits old blocks (new content hash, vLLM #42125), and
an unchanged re-upload does (same hash). The salt splits sharing groups (vLLM's ``cache_salt``):
cached tokens and TTFT would otherwise tell a caller that someone else sent the same prefix.

Blocks are reference counted: a hit adds a reference, no copy. A block whose count drops to zero
is free but keeps its hash, so it can still be hit until it is reused. Free blocks that hold no full
hashed block are reused first (the last freed first); then hashed ones in LRU order, the last block
of a sequence first (the deepest block of a chain is the least likely to be shared). With fcfs one
LRU order spans the server. With fair scheduling the blocks each tenant occupies (held by its
requests, or free and cached) count against its weighted share of the cache, and a cached block is
taken from the tenant furthest above its share (LRU within it: cache_shares.py), so one tenant's
churn evicts its own cold blocks, not another tenant's prefixes. Only blocks whose tokens were all computed are ever hashed
(:meth:`PrefixCachingBlockManager.commit`), so a failed step never publishes garbage.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Mapping

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.scheduling.cache_shares import CacheShares
from nlora_serve.engine.scheduling.sequence import Sequence

BASE_KEY = "base"  # stands for the adapter content hash of requests on the base model


def root_key(seq: Sequence) -> bytes:
    """The per-request part of every link: adapter version content hash (or :data:`BASE_KEY`) and salt."""
    adapter = seq.adapter.content_hash if seq.adapter is not None else BASE_KEY
    salt = b"" if seq.cache_salt is None else b"\x01" + seq.cache_salt.encode()
    return hashlib.blake2b(b"nlora-prefix-v1\x00" + adapter.encode() + b"\x00" + salt, digest_size=32).digest()


def block_hash(parent: bytes, key: bytes, token_ids: list[int]) -> bytes:
    """One link of the chain: 32 bytes of blake2b over the parent hash, the key and the block's token ids."""
    return hashlib.blake2b(parent + key + struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=32).digest()


class PrefixCachingBlockManager(BlockManager):
    """A :class:`BlockManager` whose full blocks outlive their sequence and are found again by hash.

    Args:
        num_blocks, block_size: as :class:`BlockManager`.
        tenant_weights: None (fcfs): free cached blocks are evicted in one server-wide LRU order.
            A mapping (policy "fair": the scheduler's ``tenant_weights``): from the tenant that
            occupies the most blocks per unit of weight, LRU within it (cache_shares.py); a block
            belongs to the tenant of the request that took it or hit it last.

    Counters (tokens): ``num_queries`` tokens of admitted sequences looked up, ``num_hits`` of them found.
    """

    def __init__(self, num_blocks: int, block_size: int, tenant_weights: Mapping[str, float] | None = None) -> None:
        # the free deque of BlockManager is replaced by the lists below: its __init__ is not called
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks  # sequences holding each block
        self._hash: list[bytes | None] = [None] * num_blocks  # the block's chain hash, once full and computed
        self._cached: dict[bytes, int] = {}  # chain hash -> block
        self._unhashed = list(range(num_blocks - 1, -1, -1))  # free blocks with no hash: reused first, from the end
        # free hashed blocks, least recently used first, per owner (one owner, None, without shares)
        self._lru: dict[str | None, OrderedDict[int, None]] = {}
        self._num_free = num_blocks
        self.shares = None if tenant_weights is None else CacheShares(tenant_weights)
        self._owner: list[str | None] = [None] * num_blocks  # tenant of each held or cached block (with shares)
        self._stamp = [0] * num_blocks  # when each free hashed block was freed (with shares: breaks ties)
        self._clock = 0
        self.num_queries = 0
        self.num_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, including cached ones that can be evicted."""
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that a later request can hit (held or free)."""
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def owner(self, block: int) -> str | None:
        """The tenant whose share ``block`` counts against while held or cached (None without shares)."""
        return self._owner[block]

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= self._num_free

    def grow(self, block_table: list[int], num_tokens: int, tenant: str | None = None) -> None:
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > self._num_free:
            raise RuntimeError(f"need {need} KV blocks, {self._num_free} free")
        for _ in range(need):
            block = self._unhashed.pop() if self._unhashed else self._evict()
            self._ref[block] = 1
            block_table.append(block)
            if self.shares is not None:  # one at a time: a long prompt's blocks count as it takes them
                self._owner[block] = tenant
                self.shares.add(tenant, 1)
        self._num_free -= need

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to every block of ``block_table`` and empty it; a block nobody holds
        any more stays cached (if hashed) until it is reused.

        Raises:
            RuntimeError: a block with no reference (a double free: a bookkeeping bug).
        """
        for block in reversed(block_table):
            if self._ref[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._num_free += 1
                if self._hash[block] is None:
                    self._unhashed.append(block)
                    if self.shares is not None:
                        self.shares.add(self._owner[block], -1)
                    continue
                owner = self._owner[block]
                lru = self._lru.get(owner)
                if lru is None:
                    lru = self._lru[owner] = OrderedDict()
                    if self.shares is not None:
                        self.shares.touch(owner)
                lru[block] = None
                self._stamp[block] = self._clock
                self._clock += 1
        block_table.clear()

    def match(self, seq: Sequence) -> list[int]:
        """Cached blocks of the longest prefix of ``seq``'s tokens, at most all but its last token
        (it must compute one token to have logits to sample). A request that asks for
        prompt logprobs finds none: cached tokens' logits were never computed (vLLM's rule too)."""
        if seq.params.prompt_logprobs is not None:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in self._hashes(seq, limit):
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def admit(self, seq: Sequence, hit: list[int], num_tokens: int) -> bool:
        """Give a waiting ``seq`` the ``hit`` blocks (a :meth:`match`) and fresh ones up to
        ``num_tokens`` tokens; its computed tokens start after the hit. False (nothing changed)
        when the blocks are short."""
        reclaimed = sum(1 for block in hit if self._ref[block] == 0)  # free now, held once taken
        if self.blocks_for(num_tokens) - len(hit) > self._num_free - reclaimed:
            return False
        tenant = seq.tenant if self.shares is not None else None
        for block in hit:
            owner = self._owner[block]
            if self._ref[block] == 0:
                lru = self._lru[owner]
                del lru[block]
                if not lru:
                    del self._lru[owner]
                self._num_free -= 1
                if self.shares is not None:
                    self.shares.touch(owner)
            if owner != tenant:  # a sharing group across tenants (no keys): the last one to hit it
                self._owner[block] = tenant
                self.shares.add(owner, -1)
                self.shares.add(tenant, 1)
            self._ref[block] += 1
        seq.block_table[:] = hit
        seq.num_hashed_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        self.grow(seq.block_table, num_tokens, seq.tenant)
        self.num_queries += seq.num_tokens
        self.num_hits += seq.num_computed_tokens
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        return True

    def commit(self, seq: Sequence) -> None:
        """Publish ``seq``'s full blocks whose tokens are all computed. A block whose hash another
        block already holds (two requests computed the same prefix at once) stays private."""
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            if self._hash[block] is None and hashes[i] not in self._cached:
                self._hash[block] = hashes[i]
                self._cached[hashes[i]] = block
        seq.num_hashed_blocks = full

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """``seq.block_hashes`` extended to (at least) its first ``num_blocks`` full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        if len(hashes) < num_blocks:
            if seq.prefix_key is None:
                seq.prefix_key = root_key(seq)
            key = seq.prefix_key
            for i in range(len(hashes), num_blocks):
                hashes.append(block_hash(hashes[-1] if hashes else b"", key, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def _evict(self) -> int:
        """Take the least recently used free hashed block (of the tenant furthest above its share,
        with shares) and drop its hash; the caller has checked there is one."""
        owner = None if self.shares is None else self.shares.victim(self._lru, self._stamp)
        lru = self._lru[owner]
        block, _ = lru.popitem(last=False)
        if not lru:
            del self._lru[owner]
        h = self._hash[block]
        self._hash[block] = None
        if self._cached.get(h) == block:
            del self._cached[h]
        if self.shares is not None:
            self.shares.add(owner, -1)
        return block
