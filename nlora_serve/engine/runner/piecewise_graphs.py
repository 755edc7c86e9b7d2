"""Prefill and mixed steps as piecewise CUDA graphs at bucketed token counts (vLLM V1's piecewise mode).

A prefill step's attention launches grids that depend on the step's sequences (their number and
longest chunk), so the step as a whole cannot be one graph. Everything else in it depends on the
token count alone, so a step of T tokens runs as the graphs of the smallest bucket b ≥ T, cut at
each attention call:

    piece 0       embedding, RoPE rows, (adapter layout), layer 0 up to attention: norm, qkv,
                  RoPE, K/V written into the cache
    piece i       layer i-1 after attention: o_proj + residual, norm, MLP + residual;
                  then layer i up to attention (1 ≤ i < L)
    piece L       layer L-1 after attention, final norm and lm_head on the sampling rows

with each layer's attention kernels run eagerly between pieces on the step's real T queries,
reading the step's own BatchInfo (engine/model/attention/cuda.py ``attend_cached``: one or two launches
a layer). Every piece reads and writes static buffers of the largest bucket's size (token ids,
positions, KV slot mapping, RoPE rows, the residual stream, q/k, the attention output, the logits
rows and each adapter pool's per-token slots and derived layout), so the addresses a graph
recorded are the ones a later step fills. Rows T..b-1 are padding: token 0 at position 0, slot −1
for every pool, K/V written into the sink block (the KV cache's last, which the block manager
never hands out), no query in attention, never sampled (the logits rows index real tokens only).

Graphs are keyed like decode graphs (engine/runner/cuda_graphs.py): (bucket, each adapter pool of the
step at its generation); a pool that grows or allocates bumps its generation and the next step
captures anew. Adapters inside pieces run the per-token fixed-grid form (the hook's decode form,
kernels/triton_ops/triton_path.py ``apply_triton_per_token``: grids of the token count only); steps above the
largest bucket, or whose adapters took the segment form, run eagerly.

Off by default (``EngineConfig.piecewise_graphs``) until an H200 run confirms it pays: bench/gpu_check.sh
step ``piecewise_256`` times the 256-request engine bench with it on and off.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nlora_serve.engine.model.attention.cpu import write_kv
from nlora_serve.engine.model.batch_info import BatchInfo
from nlora_serve.engine.runner.keyed_graphs import KeyedGraphs

# token-count buckets (vLLM's piecewise capture sizes are similar powers of two)
PIECEWISE_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)


def piecewise_sizes(max_num_batched_tokens: int) -> tuple[int, ...]:
    """The buckets for a step budget: those below it and the budget itself when it is at most the
    largest of :data:`PIECEWISE_SIZES` (larger steps run eagerly)."""
    top = PIECEWISE_SIZES[-1]
    if max_num_batched_tokens > top:
        return PIECEWISE_SIZES
    return tuple(s for s in PIECEWISE_SIZES if s < max_num_batched_tokens) + (max_num_batched_tokens,)


@dataclass(slots=True)
class _Pieces:
    """The captured pieces of one (bucket, pools) key."""

    replays: list[Callable[[], None]]  # L + 1 pieces, in order
    logits: torch.Tensor  # [S_b, V] float32: the last piece's output (rows of the shared buffer)
    slot_rows: list[torch.Tensor]  # per pool, [b] int32 static per-token slots (−1 = none)
    batches: list  # per pool, its static PerTokenAdapterBatch over that row


class PiecewiseGraphs(KeyedGraphs):
    """Static buffers and captured pieces of one model runner.

    Args:
        model: the runner's :class:`~nlora_serve.engine.model.llama.LlamaModel` (torch path: no native
            layer ops). kv_cache: its cache [layers, 2, NB, BS, KVH, D], whose last block is the
            pad sink. max_num_batched_tokens: the step budget (sizes the buckets).
        max_num_seqs: sequences per step at most (sizes the logits rows). capture: the seam
            (:class:`~nlora_serve.engine.runner.cuda_graphs.CudaGraphCapture` or ``EagerCapture``).
        logits: [max_num_seqs, V] float32, the output every bucket's last piece writes its first
            rows of (shared with the decode graphs; see :class:`~nlora_serve.engine.runner.cuda_graphs.DecodeGraphs`).
        **bounds: :class:`~nlora_serve.engine.runner.keyed_graphs.KeyedGraphs`' ``max_combinations``,
            ``idle_steps``, ``counts``.
    Raises:
        ValueError: the model runs native layer ops (CPU only; not capturable).
    """

    def __init__(self, model, kv_cache: torch.Tensor, max_num_batched_tokens: int, max_num_seqs: int,
                 capture, logits: torch.Tensor, **bounds) -> None:
        if model.layer_ops is not None:
            raise ValueError("piecewise graphs need the torch layer path (no native layer ops)")
        from nlora_serve.engine.model.attention.cuda import attend_cached  # Triton: imported where it runs
        super().__init__(**bounds)
        self.attend = attend_cached
        self.model, self.kv_cache, self.capture, self.logits = model, kv_cache, capture, logits
        self.sink_slot = (kv_cache.shape[2] - 1) * kv_cache.shape[3]  # first slot of the sink block
        self.sizes = piecewise_sizes(max_num_batched_tokens)
        self.max_num_seqs = max_num_seqs
        spec, size, dev = model.spec, self.sizes[-1], model.device
        heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        i64 = dict(dtype=torch.long, device=dev)
        self.input_ids = torch.zeros(size, **i64)
        self.positions = torch.zeros(size, **i64)
        self.slot_mapping = torch.full((size,), self.sink_slot, **i64)
        self.logits_indices = torch.zeros(min(size, max_num_seqs), **i64)
        self.cos = torch.zeros(size, hd, device=dev)  # [b, D] float32 RoPE rows of the step's positions
        self.sin = torch.zeros(size, hd, device=dev)
        self.x = torch.zeros(size, spec.hidden_size, device=dev)  # the residual stream, float32
        self.qk = torch.zeros(size, heads + kv_heads, hd, dtype=model.dtype, device=dev)  # rotated q, k
        self.attn = torch.zeros(size, heads, hd, dtype=model.dtype, device=dev)  # attention output
        # graphs (KeyedGraphs): (bucket, pools) -> _Pieces

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, info: BatchInfo, hook) -> torch.Tensor | None:
        """One step through its bucket's pieces, attention eager between them.

        Args:
            input_ids, positions: [T] int64 on the device. info: the step's layout (real tokens).
            hook: the AdapterHook in its per-token form, or None.
        Returns:
            [R, V] float32 logits of ``info.logits_indices`` (a view of the last piece's output), or
            None, nothing done: the step's pools are a combination over the cap (run it eagerly).
        """
        n, rows = input_ids.shape[0], info.logits_indices.shape[0]
        size = self.size_for(n)
        pools = hook.per_token_pools() if hook is not None else []
        pieces = self.graph_for(size, pools, hook)
        if pieces is None:
            return None
        self._load(n, size, rows, input_ids, positions, info, pieces.slot_rows, hook)
        q, out = self.qk[:n, :self.model.spec.num_heads], self.attn[:n]
        pieces.replays[0]()
        for i, (layer, kv_layer) in enumerate(zip(self.model.layers, self.kv_cache)):
            self.attend(q, kv_layer, info, layer.scale, out)  # this step's K/V are in the cache
            pieces.replays[i + 1]()
        self.replayed += 1
        return pieces.logits[:rows]

    def _capture(self, size: int, pools: list, hook) -> _Pieces:
        dev = self.x.device
        slot_rows = [torch.full((size,), -1, dtype=torch.int32, device=dev) for _ in pools]
        rows = min(size, self.max_num_seqs)
        self._pad(0, size, 0, rows, slot_rows)  # every row a pad row while capturing
        batches = []
        if hook is not None:
            hook.prepare_pools(pools, dev)  # device tables exist before capture
            batches = hook.static_batches(pools, slot_rows)

        def scoped(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def piece() -> torch.Tensor:
                with hook.static_layout(pools, batches) if hook is not None else nullcontext():
                    return fn()
            return piece

        replays = []
        for i in range(len(self.model.layers) + 1):
            replay, out = self.capture.capture(scoped(self._piece_fn(i, size, rows, pools, batches, hook)))
            replays.append(replay)
        return _Pieces(replays, out, slot_rows, batches)

    def _piece_fn(self, i: int, size: int, rows: int, pools: list, batches: list, hook) -> Callable[[], torch.Tensor]:
        """Piece ``i`` of a bucket (see the module docstring), on the static buffers' first ``size`` rows."""
        model, layers, heads = self.model, self.model.layers, self.model.spec.num_heads
        x, qk, slots = self.x[:size], self.qk[:size], self.slot_mapping[:size]
        cos, sin, attn = self.cos[:size], self.sin[:size], self.attn[:size].view(size, -1)

        def before_attention(j: int) -> None:
            _, v = layers[j].attention_inputs(x, cos.unsqueeze(1), sin.unsqueeze(1), qk_out=qk)
            write_kv(self.kv_cache[j], qk[:, heads:], v, slots)

        def first() -> torch.Tensor:
            ids, pos = self.input_ids[:size], self.positions[:size]
            if hook is not None:
                hook.derive_into(pools, batches)
            x.copy_(F.embedding(ids, model.embed))
            torch.index_select(model.cos, 0, pos, out=cos)
            torch.index_select(model.sin, 0, pos, out=sin)
            before_attention(0)
            return x

        def middle() -> torch.Tensor:
            layers[i - 1].attention_output(x, attn, out=x)
            before_attention(i)
            return x

        def last() -> torch.Tensor:
            layers[-1].attention_output(x, attn, out=x)
            return model.logits(x, self.logits_indices[:rows], out=self.logits[:rows])

        return first if i == 0 else last if i == len(layers) else middle

    def _pad(self, n: int, size: int, r: int, rows: int, slot_rows: list[torch.Tensor]) -> None:
        """Rows n..size-1 padding (token 0 at position 0, K/V into the sink, no adapter); logits rows
        r..rows-1 read token 0."""
        if n < size:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(self.sink_slot)
            for row in slot_rows:
                row[n:size].fill_(-1)
        if r < rows:
            self.logits_indices[r:rows].zero_()

    def _load(self, n: int, size: int, r: int, input_ids, positions, info: BatchInfo, slot_rows, hook) -> None:
        """Device-to-device copies of the step into the static buffers (no host value read)."""
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(info.slot_mapping)
        self.logits_indices[:r].copy_(info.logits_indices)
        for row, step_row in zip(slot_rows, hook.per_token_slot_rows() if hook is not None else []):
            row[:n].copy_(step_row)
        self._pad(n, size, r, min(size, self.max_num_seqs), slot_rows)
