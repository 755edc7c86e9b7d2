"""Decode steps replayed as CUDA graphs at bucketed batch sizes (vLLM's capture sizes).

A decode-only step of n sequences runs as the graph of the smallest capture size b ≥ n: its
inputs are copied into static buffers (rows n..b-1 padded: they write their K/V into a sink block
the block manager never hands out, and their logits are dropped), then the graph replays. One
graph per (size, the step's adapter pools and their generations): a base-only step replays a graph
with no adapter kernel in it; a pool that grows or allocates a table bumps its generation, so the
next step captures anew instead of replaying reads of freed memory. Mixed prefill/decode steps and
steps larger than the largest size run eagerly, as do steps of an adapter-pool combination over the
cap on kept combinations (keyed_graphs.py).

The capture itself sits behind a small seam: :class:`CudaGraphCapture` (torch.cuda.CUDAGraph) on a
GPU, :class:`EagerCapture` anywhere (replay re-runs the step on the same static buffers), which is
how the CPU tests exercise everything here, with :class:`~nlora_serve.engine.runner.graph_safety.GraphSafetyMode`
around capture and replays.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from nlora_serve.engine.model.batch_info import BatchInfo
from nlora_serve.engine.runner.keyed_graphs import KeyedGraphs

# vLLM's default cudagraph capture sizes: 1, 2, 4, then every 8 up to 512
CAPTURE_SIZES = (1, 2, 4) + tuple(range(8, 513, 8))


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The capture sizes up to ``max_num_seqs`` (and ``max_num_seqs`` itself when it is not one)."""
    sizes = tuple(s for s in CAPTURE_SIZES if s < max_num_seqs)
    return sizes + (max_num_seqs,)


@contextmanager
def quiet_capture() -> Iterator[None]:
    """Make ``gc.collect``, ``torch.cuda.empty_cache`` and (where torch has it) the pinned host
    cache's ``torch._C._host_emptyCache`` no-ops for the block, as vLLM patches the first two around
    its captures. ``torch.cuda.graph`` calls them on every capture (gc.collect only under torch's
    ``force_cudagraph_gc``): a piecewise bucket is L + 1 captures, and an adapter graph captured on
    first use mid-serving would hand the allocator's cached device and pinned blocks back to the
    driver, so the next steps pay cudaMalloc / cudaHostAlloc again (the sampler pins a buffer per
    step). Process-wide while it lasts: another thread's call in that window is a no-op too.
    Windows may overlap (two engines' threads): the originals are saved by the first to begin and
    put back when the last ends.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = [(gc, "collect", gc.collect), (torch.cuda, "empty_cache", torch.cuda.empty_cache)]
            if hasattr(torch._C, "_host_emptyCache"):
                _quiet_saved.append((torch._C, "_host_emptyCache", torch._C._host_emptyCache))
            for owner, name, _ in _quiet_saved:
                setattr(owner, name, (lambda *args, **kwargs: 0) if name == "collect"
                        else (lambda *args, **kwargs: None))
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for owner, name, original in _quiet_saved:
                    setattr(owner, name, original)
                _quiet_saved = []


_quiet_lock = threading.Lock()
_quiet_depth = 0  # quiet_capture windows open now
_quiet_saved: list = []  # (owner, name, original) the first window replaced


class CudaGraphCapture:
    """The GPU seam: warm up on a side stream, capture into a pool shared by all graphs (under
    :func:`quiet_capture`)."""

    def __init__(self) -> None:
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # compiles the Triton kernels and sets up cuBLAS before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: an admin thread's slot write (pinned host memory, its own stream's sync)
        # during a capture on the step thread must neither fail nor invalidate the capture; the
        # default "global" mode turns both into errors (seen on an H200 when tenants were loaded
        # while the step thread captured a graph)
        with quiet_capture(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        self.pool = graph.pool()
        return graph.replay, out


class EagerCapture:
    """The CPU seam: replay re-runs the step on the same static buffers into the same output.

    ``check``: run capture and every replay under a :class:`GraphSafetyMode` (one per graph),
    after one unchecked call, as :class:`CudaGraphCapture` warms up before it captures: what a
    first call fills once (cached views, contiguous copies) is then in neither the capture's
    launches nor any replay's.
    """

    def __init__(self, check: bool = False) -> None:
        self.check = check
        self.replays = 0
        self.checked_ops = 0  # ops the safety check saw in replays (a check that saw none proves nothing)

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        from nlora_serve.engine.runner.graph_safety import GraphSafetyMode
        mode = GraphSafetyMode() if self.check else None
        if mode is None:
            out = fn()
        else:
            fn()
            with mode.run(capture=True):
                out = fn()

        def replay() -> None:
            self.replays += 1
            if mode is None:
                out.copy_(fn())
                return
            with mode.run(capture=False):
                result = fn()
            self.checked_ops += mode.ops
            out.copy_(result)

        return replay, out


class DecodeGraphs(KeyedGraphs):
    """Static buffers and the captured graphs of one model runner.

    Args:
        model: the runner's LlamaModel. kv_cache: its cache, whose last block is the pad sink.
        max_num_seqs: the largest capture size. max_blocks: block-table width of a sequence.
        decode_splits: the Triton decode attention's splits. capture: the seam.
        logits: [max_num_seqs, V] float32, the output every graph writes its first rows of (one
            buffer, not one per graph: at 256 sequences and a 128k vocabulary the per-size outputs
            took 2 GiB); shared with the piecewise graphs. A step's logits are sampled before the
            next step replays a graph (same stream), as they were with one output per size.
        **bounds: :class:`KeyedGraphs`' ``max_combinations``, ``idle_steps``, ``counts``.
    """

    def __init__(self, model, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int, decode_splits: int,
                 capture, logits: torch.Tensor, **bounds) -> None:
        super().__init__(**bounds)
        self.model, self.kv_cache, self.capture, self.logits = model, kv_cache, capture, logits
        self.sizes = capture_sizes(max_num_seqs)
        self.sink_block = kv_cache.shape[2] - 1
        self.block_size = kv_cache.shape[3]
        self.decode_splits = decode_splits
        size, dev = self.sizes[-1], kv_cache.device
        i64 = dict(dtype=torch.long, device=dev)
        self.input_ids = torch.zeros(size, **i64)
        self.positions = torch.zeros(size, **i64)
        self.slot_mapping = torch.zeros(size, **i64)
        self.context_lens = torch.ones(size, **i64)
        self.arange = torch.arange(size + 1, **i64)  # query starts and logits indices of a decode step
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=dev)
        # graphs: (size, pools) -> (replay, logits output, per-pool static slot rows)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, info: BatchInfo, hook) -> torch.Tensor | None:
        """One decode step through its graph. Returns [n, V] float32 logits (a view of the graph's output),
        or None, nothing done: the step's pools are a combination over the cap (run it eagerly)."""
        n = input_ids.shape[0]
        size = self.size_for(n)
        pools = hook.per_token_pools() if hook is not None else []
        graph = self.graph_for(size, pools, hook)
        if graph is None:
            return None
        replay, out, slot_rows = graph
        self._load(n, size, input_ids, positions, info, slot_rows, hook)
        replay()
        self.replayed += 1
        return out[:n]

    def _static_info(self, size: int) -> BatchInfo:
        return BatchInfo(query_starts=self.arange[:size + 1], context_lens=self.context_lens[:size],
                         slot_mapping=self.slot_mapping[:size], logits_indices=self.arange[:size], num_decodes=size,
                         decode_block_tables=None, decode_mask=None, prefills=[],
                         block_tables=self.block_tables[:size], max_query_len=0, decode_splits=self.decode_splits)

    def _capture(self, size: int, pools: list, hook):
        slot_rows = [torch.full((size,), -1, dtype=torch.int32, device=self.kv_cache.device) for _ in pools]
        self._pad(0, size, slot_rows)  # every row a pad row: capture writes only the sink block
        info = self._static_info(size)
        if hook is not None:
            hook.prepare_pools(pools, self.kv_cache.device)  # device tables exist before capture

        def step() -> torch.Tensor:
            # fresh hook state per call: the warm-up call must not leave the capture a layout
            # derived outside the graph (it would replay that one forever)
            with hook.static_decode(pools, slot_rows) if hook is not None else nullcontext():
                x = self.model.hidden(self.input_ids[:size], self.positions[:size], self.kv_cache, info)
                return self.model.logits(x, info.logits_indices, out=self.logits[:size])

        replay, out = self.capture.capture(step)
        return replay, out, slot_rows

    def _pad(self, n: int, size: int, slot_rows: list[torch.Tensor]) -> None:
        if n == size:
            return
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(self.sink_block * self.block_size)
        self.context_lens[n:size].fill_(1)
        self.block_tables[n:size, 0].fill_(self.sink_block)
        for row in slot_rows:
            row[n:size].fill_(-1)

    def _load(self, n: int, size: int, input_ids, positions, info: BatchInfo, slot_rows, hook) -> None:
        """Device-to-device copies of the step into the static buffers (no host value read)."""
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(info.slot_mapping)
        self.context_lens[:n].copy_(info.context_lens)
        width = min(info.block_tables.shape[1], self.block_tables.shape[1])  # past max_blocks: padding
        self.block_tables[:n, :width].copy_(info.block_tables[:, :width])
        for row, step_row in zip(slot_rows, hook.per_token_slot_rows() if hook is not None else []):
            row[:n].copy_(step_row)
        self._pad(n, size, slot_rows)
