"""Per-step adapter application: the hook every projection calls (DESIGN §4, STYLE "Adapters").

Each step the engine calls :meth:`AdapterHook.begin_step` with the step's sequences, in packed
order, and the adapter version each one is pinned to. For every pool those versions live in, one
:class:`~nlora_serve.kernels.metadata.AdapterBatch` is built (a
:class:`~nlora_serve.kernels.cpu.batch.NativeBatch` on the native CPU path; in the Triton
per-token form only the [T] slot row, the layout then derived on the device); then each
projection's call adds every pool's deltas into its base output through the kernels. A step with
no adapted token costs one ``if`` per projection.

A step that mixes base, tied and LoRA requests has one entry per pool (here a TiedPool and the
LoraPool), run one after another on the same ``y``. Every token is on exactly one pool (slot −1 in
every other pool's batch; a base-model token is −1 in all of them and keeps the base output), so
the pools write disjoint rows, and the tied path's read of a token's first r columns never sees
another pool's add. With more than one pool the native tied delta is added at once, never
deferred (the conditions below).

Where the tied (IntTune) delta is computed. For a token t on slot s of a Nyström-tied pool and
each module m of a fused projection with base output y (columns of m: y[t, m]), the delta is

    y[t, m] += scaling[s] · B_m · N_m[s] · (y[t, m][:r] − bias_m[:r])       B_m = W_m[:, :r]

(A_m x = (W_m x)[:r] is the base output's own first r columns, so there is no shrink; bias_m is
the base layer's bias, where it has one; the engine's pools fold the adapter's s into N, so
scaling[s] is 1). Which call does the arithmetic depends on ``EngineConfig.kernel_backend``:

CPU, native ops (``"native"``, the CPU default, and ``load_native`` built and loaded the C
library), with the layer ops installed (``ModelRunner.set_layer_ops``: ``LayerOps.fits`` the
model's sizes)::

    DecoderLayer._native (engine/model/llama.py)
      AdaptedLinear.deferred(x): y = base GEMM, then AdapterHook.__call__(..., defer_tied=True)
        tied tokens, deferred (conditions below):
          NativeOps.tied_step(batch) (once per step) + NativeOps.tied_delta(step, plan) -> TiedDelta,
          a handle returned with y: no arithmetic yet. The op that reads y next adds it:
            q/k/v   -> LayerOps.rope(qk, ..., tied)           nlora_rope
            o       -> LayerOps.add_rms_norm(x, o, ..., tied)  nlora_add_rms_norm
            gate/up -> LayerOps.silu_mul(gate_up, tied)        nlora_silu_mul
            down    -> LayerOps.add(x, down, tied)             nlora_add_rms_norm (add only)
          (cpu/layer_ops.c; each calls tied_delta_rows in cpu/tied_delta.h, which copies TIED_CHUNK
          rows into an fp32 scratch and runs cpu/tied_apply.c's nlora_tied_apply_f32 on it, or
          nlora_tied_apply_f32_bf16n for a bf16 pool)
        tied tokens, not deferred:
          NativeOps.tied_apply(y, batch, plan) -> nlora_tied_apply_{f32,bf16}_mt, or the AMX
          form nlora_tied_apply_bf16_amx_mt (cpu/tied_apply.c): y in place
        group tokens (LoRA, NLoRA, compressed families):
          NativeOps.group_apply(y, x, batch, plan) -> cpu/group_apply.c (cpu/group_amx.c): y in place
        a projection the native plans do not serve (``_Projection.native_serves`` False):
          the torch fallback below, per module

The tied delta is deferred only when all of these hold (:meth:`AdapterHook.__call__`): the call
came through ``AdaptedLinear.deferred`` (only ``DecoderLayer._native`` makes it, and not for q/k/v
of a model with q/k head norms, Qwen3: the norms read the adapted q and k) and the hook has
the native ops (``defers_tied``); y is a CPU tensor and the native plans serve the projection;
the step has tied tokens; exactly one pool has tokens in the step (``len(self._entries) == 1``);
that pool has no per-slot bias table (``pool.bias`` empty: no adapter with ``lora_bias`` written
into it); and the plan is not an AMX plan (``NativeOps.tied_delta`` returns None for one:
``TiedProjection.delta_args`` is None there). Otherwise the same call runs ``tied_apply``.
Without the layer ops (sizes ``LayerOps.fits`` refuses) the layer runs the torch forward, whose
``AdaptedLinear.__call__`` never defers.

CPU, torch (``"torch"``; ``"native"`` when the C library cannot be loaded; the fallback above)::

    AdaptedLinear.__call__ -> AdapterHook.__call__
      -> kernels/dispatch.apply_adapters(part, x, batch, site) once per module
        -> kernels/torch_ops.apply_torch: _tied_mix (z read from y before any add), the group
           path (_group_add), then _tied_add (the expand by W[:, :r] added into y)

CUDA, Triton (``"triton"``, the CUDA default; on CPU tensors only under TRITON_INTERPRET=1)::

    decode steps, and steps of up to ``per_token_tokens`` tokens (piecewise graphs):
      AdaptedLinear.__call__ -> AdapterHook.__call__ -> AdapterHook._apply_per_token
        -> kernels/triton_ops/triton_path.apply_triton_per_token: mix (mix.py: u = N (z − bias), z read from y)
           then bgmv_expand (bgmv_expand.py: y += scaling · B u, one program per token)
    other steps:
      AdaptedLinear.__call__ -> AdapterHook.__call__ -> kernels/dispatch.apply_adapters
        -> kernels/triton_ops/triton_path.apply_triton: mix, then sgmv_expand over runs of tied tokens

(the Triton forms named are the defaults, ``triton_path.TIED_FORM = "two_launch"``; "tiled" and
"fused" replace the expand, or both launches, as triton_path.py describes).
"""

from __future__ import annotations

import weakref
from array import array
from contextlib import contextmanager
from typing import Protocol

import torch

from nlora_serve.engine.model.adapter_step import _DERIVED, _Entry, _PerTokenEntry, _PoolFacts, _Projection, _token_slots
from nlora_serve.kernels.triton_ops.per_token_batch import PerTokenAdapterBatch, derive_per_token_batch
from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, TIED, build_adapter_batch
from nlora_serve.kernels.cpu.native import NativeOps
from nlora_serve.kernels.cpu.tied_delta import TiedDelta
from nlora_serve.kernels.cpu.batch import build_native_batch


class ProjectionHook(Protocol):
    """What a projection (engine/model/llama.py ``AdaptedLinear``) calls; :class:`AdapterHook` is the engine's."""

    @property
    def defers_tied(self) -> bool:
        """Whether a call may hand back the tied delta instead of adding it (``defer_tied``)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: int, modules: tuple[str, ...],
                 widths: list[int], defer_tied: bool = False) -> TiedDelta | None:
        """Add the adapters' deltas into ``y`` [T, Σ widths] in place (see :meth:`AdapterHook.__call__`)."""


class AdapterHook:
    """Callable installed on every fused projection (q/k/v, o, gate/up, down) of every layer.

    The engine thread alone calls :meth:`begin_step` and the hook, so the step state is plain
    attributes; pools are read through views refreshed when a pool's tensors are replaced.

    Args:
        native: the native CPU ops (:func:`nlora_serve.kernels.cpu.native.load_native`); when given,
            CPU steps run through them, one call per fused projection and token kind (tied, group),
            its tokens split over torch's threads from 16 (kernels/cpu/native.py; the torch path cost
            4x the native one at prefill sizes: bench/RESULTS.md). None: the torch path of :func:`apply_adapters`, one call
            per module.
        triton: run the Triton path (:func:`apply_adapters` with backend "triton") whatever the
            device: on CUDA it is the default anyway; on CPU tensors it needs TRITON_INTERPRET=1.
    """

    def __init__(self, native: NativeOps | None = None, triton: bool = False) -> None:
        self.native = native
        self.backend = "triton" if triton else None  # None: by device (Triton on CUDA, torch on the CPU)
        self._entries: list[_Entry] = []  # per pool, its batch this step
        self._per_token: list[_PerTokenEntry] = []  # instead of _entries on a Triton per-token-form step
        # keyed by the pool itself, weakly: a pool dropped with its last adapter (residency.py) takes
        # its entries along (keyed by id(pool), they kept its tensors alive for the hook's life)
        self._facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> its _PoolFacts
        # pool -> (layer, modules) -> _Projection
        self._projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Triton backend: steps of up to this many tokens, prefill and mixed ones too, take the
        # per-token fixed-grid form (piecewise CUDA graphs, engine/runner/piecewise_graphs.py); 0: decode steps only
        self.per_token_tokens = 0
        # inside static_decode / static_layout (a graph's capture, its warm-up, a CPU replay): pool
        # tables are never rebuilt (see _pool_facts)
        self._static = False

    def begin_step(self, versions: list, query_lens: list[int], device: torch.device) -> None:
        """Set up the step.

        Args:
            versions: per sequence, in packed order, its pinned AdapterVersion (None = base model).
                A version must be resident (``pool`` and ``slot`` set).
            query_lens: tokens each sequence contributes to this step (same order).
            device: where the activations live.
        """
        self._entries, self._per_token = [], []
        pools = {id(v.pool): v.pool for v in versions if v is not None}
        if not pools:
            return
        decode = all(n == 1 for n in query_lens)
        if self.backend == "triton" and (decode or sum(query_lens) <= self.per_token_tokens):
            # per-token slots only; everything else is derived on the device
            lens = None if decode else torch.tensor(query_lens, dtype=torch.int64)
            # pools in one order whatever the sequences' order: a CUDA graph is keyed by its pools in
            # order (engine/runner/cuda_graphs.py), and steps of the same pools in another order captured
            # again mid-serving (a device sync, a warm-up forward and a capture on the step thread)
            self._per_token = [_PerTokenEntry(pool, _token_slots(array("i", [
                v.slot if v is not None and id(v.pool) == key else NO_ADAPTER for v in versions]), lens))
                for key, pool in sorted(pools.items())]
            for pool in pools.values():  # before the forward (and any capture or replay) reads them
                self._refresh_ranks(pool, device)
            return
        lens = torch.tensor(query_lens, dtype=torch.int64)
        # the native CPU ops read five of the batch's tensors: build just those (kernels/cpu/batch.py),
        # and the full batch only if a projection falls back to the torch path
        lean = self.native is not None and device.type == "cpu"
        for key, pool in pools.items():
            seq_slots = torch.tensor([v.slot if v is not None and id(v.pool) == key else NO_ADAPTER
                                      for v in versions], dtype=torch.int32)
            token_slots = torch.repeat_interleave(seq_slots, lens)  # [T]
            batch = (build_native_batch(token_slots, pool.slot_ranks, pool.slot_scalings, pool.slot_families)
                     if lean else build_adapter_batch(token_slots, pool.slot_ranks, pool.slot_scalings,
                                                      pool.slot_families, device=device))
            self._entries.append(_Entry(pool, batch, token_slots, device))

    def graphable(self) -> bool:
        """True when this step's adapters (if any) run the fixed-grid (per-token) form."""
        return not self._entries

    def per_token_pools(self) -> list:
        """The pools of this per-token-form step, in :meth:`step_rows` order."""
        return [e.pool for e in self._per_token]

    def per_token_slot_rows(self) -> list[torch.Tensor]:
        """This per-token-form step's slot rows on the device (after :meth:`bind_rows`)."""
        return [e.slots for e in self._per_token]

    def static_batches(self, pools: list, slot_rows: list[torch.Tensor]) -> list[PerTokenAdapterBatch]:
        """Per pool, a layout over ``slot_rows`` (static [T] int32 buffers) whose tensors are static
        buffers too: derived once here (outside any capture), refreshed in place by :meth:`derive_into`."""
        out = []
        for pool, row in zip(pools, slot_rows):
            facts = self._pool_facts(pool, row.device)
            out.append(derive_per_token_batch(row, facts.families, facts.scalings, pool.rank, facts.has_tied,
                                              facts.has_group, slot_ranks=facts.ranks if facts.has_group else None))
        return out

    def derive_into(self, pools: list, batches: list[PerTokenAdapterBatch]) -> None:
        """Derive each pool's layout from its static slot row again and copy it into ``batches``'
        buffers (device ops only: the first piece of a piecewise graph runs it)."""
        for pool, static in zip(pools, batches):
            facts = self._pool_facts(pool, static.token_slots.device)
            fresh = derive_per_token_batch(static.token_slots, facts.families, facts.scalings, pool.rank, facts.has_tied,
                                           facts.has_group, slot_ranks=static.slot_ranks)
            for name in _DERIVED:
                if getattr(static, name) is not None:
                    getattr(static, name).copy_(getattr(fresh, name))

    @contextmanager
    def static_layout(self, pools: list, batches: list[PerTokenAdapterBatch]):
        """Within the block, the per-token form reads ``batches`` (from :meth:`static_batches`) as
        they are, derived by :meth:`derive_into` earlier in the step (a piece of a piecewise graph)."""
        saved, static = self._per_token, self._static
        self._per_token = [_PerTokenEntry(pool, b.token_slots, b.token_slots, b) for pool, b in zip(pools, batches)]
        self._static = True
        try:
            yield
        finally:
            self._per_token, self._static = saved, static

    def prepare_pools(self, pools: list, device: torch.device) -> None:
        """Put each pool's per-slot tables on the device now (before a CUDA graph captures reads of them)."""
        for pool in pools:
            self._pool_facts(pool, device)

    @contextmanager
    def static_decode(self, pools: list, slot_rows: list[torch.Tensor]):
        """Within the block, the decode form reads ``slot_rows`` (a graph's static buffers) and derives
        its layout from them afresh at the first projection, as a captured graph does at every replay."""
        saved, static = self._per_token, self._static
        self._per_token = [_PerTokenEntry(pool, slot_rows[i], slot_rows[i]) for i, pool in enumerate(pools)]
        self._static = True
        try:
            yield
        finally:
            self._per_token, self._static = saved, static

    def step_rows(self) -> list[torch.Tensor]:
        """The host [T] int32 slot rows of a per-token-form step (a decode step, or one of up to
        :attr:`per_token_tokens` tokens), one per pool, for the step's one host-to-device copy."""
        return [e.host_slots for e in self._per_token]

    def bind_rows(self, rows: list[torch.Tensor]) -> None:
        """Receive :meth:`step_rows` on the device (same order)."""
        for entry, row in zip(self._per_token, rows):
            entry.slots = row

    def end_step(self) -> None:
        """Forget the step (no tensor of it outlives it)."""
        self._entries, self._per_token = [], []

    @property
    def defers_tied(self) -> bool:
        """Whether a call may hand back the tied delta instead of adding it (``defer_tied``)."""
        return self.native is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: int, modules: tuple[str, ...],
                 widths: list[int], defer_tied: bool = False) -> TiedDelta | None:
        """Add the step's adapter deltas into ``y`` [T, Σ widths] (a fused base output) in place.

        ``x`` [T, in] is the projection's input; module i owns ``widths[i]`` columns, in order.
        With ``defer_tied``, the native tied op's delta may come back unadded instead (one pool
        in the step, no per-tenant bias, not an AMX plan): the caller hands it to the native op
        that reads ``y`` next (kernels/cpu/layer_ops.py), so ``y`` is read once. Returns that delta,
        or None when every delta was added.
        """
        deferred = None
        for entry in self._per_token:
            self._apply_per_token(entry, x, y, layer, modules, widths)
        for entry in self._entries:
            pool, batch = entry.pool, entry.batch
            proj = self._projection(pool, layer, modules, widths)
            if self.native is not None and not y.is_cuda and proj.native_serves(batch):
                # Tied and group tokens are disjoint rows: neither op reads a row the other writes.
                if batch.num_tied:
                    if defer_tied and len(self._entries) == 1 and not pool.bias:
                        if entry.tied_step is None:
                            entry.tied_step = self.native.tied_step(batch)
                        deferred = self.native.tied_delta(entry.tied_step, proj.tied)
                    if deferred is None:
                        self.native.tied_apply(y, batch, proj.tied)
                if batch.num_group:
                    self.native.group_apply(y, x, batch, proj.group)
            else:
                full = entry.full_batch()
                for part, site in zip(y.split(widths, dim=-1), proj.sites):
                    if site is not None:
                        apply_adapters(part, x, full, site, self.backend)
            if pool.bias:
                for module, part in zip(modules, y.split(widths, dim=-1)):
                    pool.add_bias(part, batch, (layer, module))
        return deferred

    def _apply_per_token(self, entry: _PerTokenEntry, x: torch.Tensor, y: torch.Tensor, layer: int,
                         modules: tuple[str, ...], widths: list[int]) -> None:
        """The fixed-grid Triton path: device ops and kernels only, no host value read back."""
        if entry.batch is None:  # the first projection of the step (inside a captured graph too)
            facts = self._pool_facts(entry.pool, y.device)
            slots = entry.slots if entry.slots is not None else entry.host_slots.to(y.device)
            entry.batch = derive_per_token_batch(slots, facts.families, facts.scalings, entry.pool.rank,
                                                 facts.has_tied, facts.has_group,
                                                 slot_ranks=facts.ranks if facts.has_group else None)
        proj = self._projection(entry.pool, layer, modules, widths)
        for module, part, site in zip(modules, y.split(widths, dim=-1), proj.sites):
            if site is not None:
                from nlora_serve.kernels.triton_ops.triton_path import apply_triton_per_token  # Triton only where it runs
                apply_triton_per_token(part, x, entry.batch, site)
            table = entry.pool.bias.get((layer, module)) if entry.pool.bias else None
            if table is not None:  # dense: every token gathers a row, non-adapted ones add zero
                slots = entry.batch.token_slots
                rows = table.index_select(0, slots.clamp(min=0))
                part += torch.where((slots >= 0)[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    def _pool_facts(self, pool, device: torch.device) -> _PoolFacts:
        """The pool's device tables, rebuilt when its generation moved on, except in a static block
        (:meth:`static_decode`, :meth:`static_layout`): an admin thread may grow the pool or give it
        a table while the step thread captures a graph of it, and a rebuild there would copy host
        tables in (a blocking copy and a read-back, which a CUDA stream capture refuses: the step
        would fail, and every request with it). The graph, keyed by the generation it was captured
        at (prepare_pools' tables), is replaced at the next step anyway."""
        facts = self._facts.get(pool)
        if facts is None or (facts.generation != pool.generation and not self._static):
            families = pool.slot_families
            ranks = pool.slot_ranks.to(torch.int32, copy=True)
            facts = self._facts[pool] = _PoolFacts(
                pool.generation, families.to(device, torch.int32), pool.slot_scalings.to(device, torch.float32),
                bool((families == TIED).any()), bool((families >= 0).any()), ranks.to(device), ranks)
        return facts

    def _refresh_ranks(self, pool, device: torch.device) -> None:
        """Copy the pool's slot ranks to the device in place when a slot was rewritten since."""
        facts = self._pool_facts(pool, device)
        if not torch.equal(facts.host_ranks, pool.slot_ranks.to(torch.int32)):
            facts.host_ranks = pool.slot_ranks.to(torch.int32, copy=True)
            facts.ranks.copy_(facts.host_ranks)

    def _projection(self, pool, layer: int, modules: tuple[str, ...], widths: list[int]) -> _Projection:
        key = (layer, modules)
        cached = self._projections.get(pool)
        if cached is None:
            cached = self._projections[pool] = {}
        proj = cached.get(key)
        if proj is None or proj.generation != pool.generation:
            sites = [pool.kernel_site((layer, m)) for m in modules]
            tied = group = None
            if self.native is not None:
                tied, group = self.native.plan(sites, widths), self.native.plan_group(sites, widths)
            proj = cached[key] = _Projection(pool.generation, sites, tied, group)
        return proj
