"""Scheduling and KV block management: which sequences run each step, and the KV blocks they hold
(vLLM v1's core/sched and its KV cache manager).

Modules::

    sequence.py          Sequence: one request's tokens, progress and KV blocks, as the scheduler sees them
    scheduler.py         continuous batching, chunked prefill, preemption
    fairness.py          VTC: fair scheduling across tenants
    block_manager.py     KV blocks: a free list and per-sequence block tables
    prefix_cache.py      the block manager with shared full blocks (prefix caching)
    cache_shares.py      which tenant gives up a cached block under fair scheduling
"""
