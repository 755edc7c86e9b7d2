"""Fixed-size KV blocks: a free list, per-sequence block tables, exact accounting."""

from __future__ import annotations

from collections import deque

from nlora_serve.engine.scheduling.sequence import Sequence


class BlockManager:
    """Hands out KV cache blocks of ``block_size`` tokens.

    A block table is a plain ``list[int]`` owned by its sequence: entry ``i`` holds the cache block
    of the sequence's tokens ``[i * block_size, (i + 1) * block_size)``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = [False] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """True when ``block_table`` can be extended to hold ``num_tokens`` tokens now."""
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int, tenant: str | None = None) -> None:
        """Extend ``block_table`` in place to hold ``num_tokens`` tokens (``tenant``: whose share of
        the cache the new blocks count against, with prefix caching and fair sharing; unused here).

        Raises:
            RuntimeError: not enough free blocks (callers check :meth:`can_grow` first).
        """
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > len(self._free):
            raise RuntimeError(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            self._in_use[block] = True
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        """Return every block of ``block_table`` and empty it.

        Raises:
            RuntimeError: a block is already free (a double free: a bookkeeping bug).
        """
        for block in block_table:
            if not self._in_use[block]:
                raise RuntimeError(f"KV block {block} freed twice")
            self._in_use[block] = False
            self._free.append(block)
        block_table.clear()

    # -- admission hooks of the scheduler; PrefixCachingBlockManager (prefix_cache.py) shares blocks

    def match(self, seq: Sequence) -> list[int]:
        """Blocks already holding a prefix of ``seq``'s tokens: none without prefix caching."""
        return []

    def admit(self, seq: Sequence, hit: list[int], num_tokens: int) -> bool:
        """Give a waiting ``seq`` blocks for ``num_tokens`` tokens; False (nothing changed) when short."""
        if not self.can_grow(seq.block_table, num_tokens):
            return False
        self.grow(seq.block_table, num_tokens, seq.tenant)
        seq.num_cached_tokens = max(seq.num_cached_tokens, 0)
        return True

    def commit(self, seq: Sequence) -> None:
        """Offer ``seq``'s computed full blocks to later requests: nothing to do without prefix caching."""
