"""Captured graphs by (capture size, the step's adapter pools at their generations), bounded.

Decode graphs (cuda_graphs.py) and piecewise prefill graphs (piecewise_graphs.py) share this. The
base model's graphs (no pool) are captured at start-up and kept for the runner's life. Every other
set of pools a step meets (a *combination*: the LoRA pool, a family's tied pool, both...) gets its
graphs on first use, one per capture size it runs at, and each graph holds device memory (the CUDA
graph's own nodes, what its allocations keep in the shared graph pool: outside the KV budget that
memory.py sized at start-up) and its pools alive. With one pool per family the combinations have
no bound, so at most ``max_combinations`` are kept, least recently used first out.

Over the cap, a new combination takes the place of the least recently used one only when that one
has gone ``idle_steps`` steps unused; otherwise its step runs eagerly. Evicting on every miss
thrashes once the combinations in use outnumber the cap: each step of an evicted one pays a sync,
a warm-up forward and a capture (L + 1 captures for a piecewise bucket), several times what
running it eagerly costs, and evicts the next one. Never evicting keeps a combination met once at
start for the server's life while the ones now in use run eagerly. With the idle rule each kept
combination is replaced at most once per ``idle_steps`` steps (captures bounded), and the working
set moves with the traffic. :data:`IDLE_STEPS` = 1000: 10-30 s of decode steps; a capture takes some
0.05 s a size (vLLM's logs) and a replacement recaptures only the sizes its steps meet, so even a
combination replaced at that rate costs a few percent of the step thread at worst.

The cap, :data:`MAX_ADAPTER_COMBINATIONS` = 8. vLLM captures its decode sizes once (67 at most: 1, 2,
4, then every 8 to 512), LoRA or not (its LoRA kernels read fixed-size slot tables), and measures
them: 35 sizes of Llama-3.2-1B took 0.21 GiB, some 6 MiB a graph (vLLM PR 11349's log; its piecewise
captures log 6-28 MiB a size, PR 22897); SGLang captures about 20-35 batch sizes. Here each
combination adds up to one graph per decode size (35 at 256 sequences; only the sizes its steps
meet, unless warm-up named it), whose memory the KV budget (memory.py) does not hold back; ours
share one pool and write static buffers, so less than vLLM's 6 MiB a graph is expected (not yet
measured on a GPU). 8 covers every mix of the LoRA pool and two families (7 combinations), the
common case, while keeping the worst case near 8 x 35 graphs.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Callable

MAX_ADAPTER_COMBINATIONS = 8  # adapter-pool combinations whose graphs are kept (see the module docstring)
IDLE_STEPS = 1000  # steps the least recently used combination goes unused before a new one may evict it


class KeyedGraphs(abc.ABC):
    """A subclass sets ``sizes`` (ascending) and defines ``_capture(size, pools, hook)``.

    Args:
        max_combinations: adapter-pool combinations kept at most (≥ 0; the base graphs besides).
        idle_steps: steps (of ``clock``) the least recently used combination must go unused before a
            new combination evicts it (≥ 0).
        counts: the runner's step counters; ``graph_evictions`` there counts the combinations
            evicted to make room (its own dict when None).
        clock: the runner's step count (a callable: steps started so far), shared by its decode and
            piecewise graphs so that ``idle_steps`` counts every step the runner runs; None: this
            object's own count of :meth:`graph_for` calls. With its own count each kind aged only on
            its own steps: a piecewise combination (prefill and mixed steps only) went 1000 *prefill*
            steps before a new one could take its place, minutes of decode-heavy traffic, not the
            10-30 s the idle rule is sized for.
    Raises:
        ValueError: a negative cap or idle count.
    """

    sizes: tuple[int, ...]

    def __init__(self, max_combinations: int = MAX_ADAPTER_COMBINATIONS, idle_steps: int = IDLE_STEPS,
                 counts: dict | None = None, clock: Callable[[], int] | None = None) -> None:
        if max_combinations < 0 or idle_steps < 0:
            raise ValueError(f"max_combinations ({max_combinations}) and idle_steps ({idle_steps}) must be >= 0")
        self.graphs: dict[tuple, object] = {}
        self.max_combinations, self.idle_steps = max_combinations, idle_steps
        self.counts = counts if counts is not None else {}
        self.counts.setdefault("graph_evictions", 0)
        self._pools: dict[tuple, list] = {}  # combination -> the pools its graphs read (and keep alive)
        self._last_used: OrderedDict[tuple, int] = OrderedDict()  # combination -> tick last used, oldest first
        self._clock, self._tick = clock, 0
        self.replayed = 0

    def size_for(self, n: int) -> int | None:
        """The capture size a step of ``n`` (sequences or tokens) runs at, or None (too large: eager)."""
        return next((s for s in self.sizes if s >= n), None)

    @staticmethod
    def key(size: int, pools: list) -> tuple:
        """A graph per capture size and per set of pools at their current generations."""
        return size, tuple((id(p), p.generation) for p in pools)

    def capture_base(self) -> None:
        """Capture the no-adapter graphs of every size now, largest first (as vLLM does at start-up),
        so first-use captures and the kernels' compiles stay out of serving. Adapter graphs are
        captured on first use (which pools a step needs is known only then)."""
        for size in reversed(self.sizes):
            key = self.key(size, [])
            if key not in self.graphs:
                self.graphs[key] = self._capture(size, [], None)

    def graph_for(self, size: int, pools: list, hook):
        """The captured graph of (size, pools), captured now if it is new, or None: the combination
        is new, the cap is reached and none kept has gone ``idle_steps`` unused (run the step
        eagerly). Before a capture, graphs no step can replay again are dropped (:meth:`drop_stale`)."""
        self._tick = self._tick + 1 if self._clock is None else self._clock()
        key = self.key(size, pools)
        combo = key[1]
        if key not in self.graphs:
            self.drop_stale()
        if combo and not self._admit(combo, pools):
            return None
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, pools, hook)
        return self.graphs[key]

    def drop_stale(self) -> None:
        """Drop every graph that reads a pool at an older generation (it reads freed memory: never
        replayed again) or a pool its Residency dropped (``retired``: no step reads it again, and
        the graph holds it alive). Step thread only; cheap (at most ``max_combinations`` sets)."""
        for combo, pools in list(self._pools.items()):
            if any(getattr(p, "retired", False) or p.generation != gen for p, (_, gen) in zip(pools, combo)):
                self._drop(combo)

    def _admit(self, combo: tuple, pools: list) -> bool:
        if combo in self._last_used:
            self._last_used[combo] = self._tick
            self._last_used.move_to_end(combo)
            return True
        if len(self._last_used) >= self.max_combinations:
            oldest, last = next(iter(self._last_used.items()), (None, None))
            if oldest is None or self._tick - last < self.idle_steps:
                return False
            self._drop(oldest)
            self.counts["graph_evictions"] += 1
        self._last_used[combo] = self._tick
        self._pools[combo] = list(pools)
        return True

    def _drop(self, combo: tuple) -> None:
        """Let go every size's graph of ``combo`` (and its pools)."""
        for key in [k for k in self.graphs if k[1] == combo]:
            del self.graphs[key]
        self._pools.pop(combo, None)
        self._last_used.pop(combo, None)

    @abc.abstractmethod
    def _capture(self, size: int, pools: list, hook):
        """Capture the graph(s) of one (size, pools) key on the subclass's static buffers."""
