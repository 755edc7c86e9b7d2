"""Per-step adapter application: the hook every projection calls (DESIGN §4, STYLE "Adapters").

Each step the engine calls :meth:`AdapterHook.begin_step` with the step's sequences, in packed
order, and the adapter version each one is pinned to. For every pool those versions live in, one
:class:`~nlora_serve.kernels.metadata.AdapterBatch` is built; then each projection's call adds
every pool's deltas into its base output through the kernels' dispatch. A step with no adapted
token costs one ``if`` per projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, AdapterBatch, build_adapter_batch
from nlora_serve.kernels.native import GroupProjection, NativeOps, TiedProjection

# The native ops run on one core and cost ~4 us (tied) / ~8 us (LoRA, r = 16) a token per layer;
# torch's GEMMs catch up at a few hundred tokens (bench/adapter_kernels.py: equal at T = 512 in bf16) and
# use both cores, so prefill-sized steps stay on the torch path.
NATIVE_MAX_TOKENS = 256


@dataclass(slots=True)
class _Projection:
    """One pool's weights at one fused projection, cached per pool generation."""

    generation: int  # the pool's generation these views were made from
    sites: list  # per module, its SiteWeights (None: the pool's family skips the module)
    tied: TiedProjection | None  # the native tied op's layout, when it serves this projection
    group: GroupProjection | None  # the native group op's layout, likewise

    def native_serves(self, batch: AdapterBatch) -> bool:
        """True when the native ops cover every token kind of ``batch`` at this projection."""
        return ((not batch.num_tied or self.tied is not None) and (not batch.num_group or self.group is not None)
                and (self.tied is not None or self.group is not None))


class AdapterHook:
    """Callable installed on every fused projection (q/k/v, o, gate/up, down) of every layer.

    The engine thread alone calls :meth:`begin_step` and the hook, so the step state is plain
    attributes; pools are read through views refreshed when a pool's tensors are replaced.

    Args:
        native: the native CPU ops (:func:`nlora_serve.kernels.native.load_native`); when given,
            steps of ≤ NATIVE_MAX_TOKENS on the CPU run through them, one call per fused projection
            and token kind (tied, group). None: the torch path of :func:`apply_adapters`, one call
            per module.
        triton: run the Triton path (:func:`apply_adapters` with backend "triton") whatever the
            device: on CUDA it is the default anyway; on CPU tensors it needs TRITON_INTERPRET=1.
    """

    def __init__(self, native: NativeOps | None = None, triton: bool = False) -> None:
        self.native = native
        self.backend = "triton" if triton else None  # None: by device (Triton on CUDA, torch on the CPU)
        self._entries: list[tuple[object, AdapterBatch]] = []  # (pool, its batch) this step
        self._projections: dict[tuple[int, int, tuple[str, ...]], _Projection] = {}  # (pool id, layer, modules)

    def begin_step(self, versions: list, query_lens: list[int], device: torch.device) -> None:
        """Set up the step.

        Args:
            versions: per sequence, in packed order, its pinned AdapterVersion (None = base model).
                A version must be resident (``pool`` and ``slot`` set).
            query_lens: tokens each sequence contributes to this step (same order).
            device: where the activations live.
        """
        self._entries = []
        pools = {id(v.pool): v.pool for v in versions if v is not None}
        if not pools:
            return
        lens = torch.tensor(query_lens, dtype=torch.int64)
        for key, pool in pools.items():
            seq_slots = torch.tensor([v.slot if v is not None and id(v.pool) == key else NO_ADAPTER
                                      for v in versions], dtype=torch.int32)
            token_slots = torch.repeat_interleave(seq_slots, lens)  # [T]
            batch = build_adapter_batch(token_slots, pool.slot_ranks, pool.slot_scalings,
                                        pool.slot_families, device=device)
            self._entries.append((pool, batch))

    def end_step(self) -> None:
        """Forget the step (no tensor of it outlives it)."""
        self._entries = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: int, modules: tuple[str, ...],
                 widths: list[int]) -> None:
        """Add the step's adapter deltas into ``y`` [T, Σ widths] (a fused base output) in place.

        ``x`` [T, in] is the projection's input; module i owns ``widths[i]`` columns, in order.
        """
        for pool, batch in self._entries:
            proj = self._projection(pool, layer, modules, widths)
            if (self.native is not None and batch.num_tokens <= NATIVE_MAX_TOKENS and not y.is_cuda
                    and proj.native_serves(batch)):
                # Tied and group tokens are disjoint rows: neither op reads a row the other writes.
                if batch.num_tied:
                    self.native.tied_apply(y, batch, proj.tied)
                if batch.num_group:
                    self.native.group_apply(y, x, batch, proj.group)
            else:
                for part, site in zip(y.split(widths, dim=-1), proj.sites):
                    if site is not None:
                        apply_adapters(part, x, batch, site, self.backend)
            if pool.bias:
                for module, part in zip(modules, y.split(widths, dim=-1)):
                    pool.add_bias(part, batch, (layer, module))

    def _projection(self, pool, layer: int, modules: tuple[str, ...], widths: list[int]) -> _Projection:
        key = (id(pool), layer, modules)
        proj = self._projections.get(key)
        if proj is None or proj.generation != pool.generation:
            sites = [pool.kernel_site((layer, m)) for m in modules]
            tied = group = None
            if self.native is not None:
                tied, group = self.native.plan(sites, widths), self.native.plan_group(sites, widths)
            proj = self._projections[key] = _Projection(pool.generation, sites, tied, group)
        return proj
