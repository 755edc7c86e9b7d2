"""Per-step adapter application: the hook every projection calls (DESIGN §4, STYLE "Adapters").

Each step the engine calls :meth:`AdapterHook.begin_step` with the step's sequences, in packed
order, and the adapter version each one is pinned to. For every pool those versions live in, one
:class:`~nlora_serve.kernels.metadata.AdapterBatch` is built; then each projection's call adds
every pool's deltas into its base output through the kernels' dispatch. A step with no adapted
token costs one ``if`` per projection.
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, AdapterBatch, build_adapter_batch


class AdapterHook:
    """Callable installed on all seven projections of every layer.

    The engine thread alone calls :meth:`begin_step` and the hook, so the step state is plain
    attributes; pools are read through views refreshed when a pool's tensors are replaced.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[object, AdapterBatch]] = []  # (pool, its batch) this step
        self._views: dict[tuple[int, int, int, str], object] = {}  # (pool id, generation, site) -> view

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

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> None:
        """Add the step's adapter deltas into ``y`` [T, out] (a view of the base output) in place."""
        for pool, batch in self._entries:
            view = self._view(pool, (layer, module))
            if view is not None:
                apply_adapters(y, x, batch, view)
                pool.add_bias(y, batch, (layer, module))

    def _view(self, pool, site: tuple[int, str]):
        key = (id(pool), pool.generation, *site)
        if key not in self._views:
            self._views[key] = pool.kernel_site(site)
        return self._views[key]
