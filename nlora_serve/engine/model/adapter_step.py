"""What :class:`~nlora_serve.engine.model.adapter_layer.AdapterHook` holds per step, per pool and per
projection: one pool's batch on the torch / native path (``_Entry``) or its slot row on the Triton
per-token path (``_PerTokenEntry``), one pool's weights at a fused projection (``_Projection``), a
pool's per-slot tables on the device (``_PoolFacts``), and the per-token form's host slot row
(``_token_slots``) and derived layout fields (``_DERIVED``). The hook's module docstring traces
where each path's arithmetic runs."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from nlora_serve.kernels.triton_ops.per_token_batch import PerTokenAdapterBatch
from nlora_serve.kernels.metadata import AdapterBatch, build_adapter_batch
from nlora_serve.kernels.cpu.native import GroupProjection, TiedProjection
from nlora_serve.kernels.cpu.tied_delta import TiedStep
from nlora_serve.kernels.cpu.batch import NativeBatch


@dataclass(slots=True)
class _Projection:
    """One pool's weights at one fused projection, cached per pool generation."""

    generation: int  # the pool's generation these views were made from
    sites: list  # per module, its KernelSiteWeights (None: the pool's family skips the module)
    tied: TiedProjection | None  # the native tied op's layout, when it serves this projection
    group: GroupProjection | None  # the native group op's layout, likewise

    def native_serves(self, batch: AdapterBatch) -> bool:
        """True when the native ops cover every token kind of ``batch`` at this projection."""
        return ((not batch.num_tied or self.tied is not None) and (not batch.num_group or self.group is not None)
                and (self.tied is not None or self.group is not None))


@dataclass(slots=True)
class _Entry:
    """One pool in a step of the torch / native path: its batch, and the full one when needed."""

    pool: object
    batch: AdapterBatch | NativeBatch  # NativeBatch on the native CPU path (all the native ops read)
    token_slots: torch.Tensor  # [T] int32: each token's slot in this pool, −1 = none
    device: torch.device
    full: AdapterBatch | None = None  # built on the first projection the native ops do not serve
    tied_step: TiedStep | None = None  # the batch's tied tokens for deferred deltas, built on first use

    def full_batch(self) -> AdapterBatch:
        """The step's complete AdapterBatch (the torch path's), built once."""
        if self.full is None:
            self.full = (self.batch if isinstance(self.batch, AdapterBatch) else build_adapter_batch(
                self.token_slots, self.pool.slot_ranks, self.pool.slot_scalings, self.pool.slot_families,
                device=self.device))
        return self.full


@dataclass(slots=True)
class _PerTokenEntry:
    """One pool in a per-token-form step of the Triton backend: slots travel in the step's one copy."""

    pool: object
    host_slots: torch.Tensor  # [T] int32 on the host: each token's slot in this pool, −1 = none
    slots: torch.Tensor | None = None  # the same on the device (a view of the step buffer)
    batch: PerTokenAdapterBatch | None = None  # derived on the device at the first projection


@dataclass(slots=True)
class _PoolFacts:
    """A pool's per-slot tables on the device and its path flags, refreshed per pool generation."""

    generation: int
    families: torch.Tensor  # [S] int32
    scalings: torch.Tensor  # [S] float32
    has_tied: bool
    has_group: bool
    # [S] int32: each slot's rank, so the grouped kernels stop there instead of at the pool's width.
    # Slots are rewritten without a new generation, so it is refreshed in place (same address: a
    # captured graph reads the new values) whenever the host table differs from ``host_ranks``.
    ranks: torch.Tensor
    host_ranks: torch.Tensor  # [S] int32 on the host: what ``ranks`` holds


# the layout tensors derive_per_token_batch computes from the slots (the rest are the slots and pool tables)
_DERIVED = ("tok_tied_slot", "tok_group_slot", "tok_group_family", "group_order", "group_key")


def _token_slots(seq_slots: array, lens: torch.Tensor | None) -> torch.Tensor:
    """[T] int32 host slots per token: ``seq_slots`` per sequence repeated ``lens`` [S] times (None: once)."""
    slots = torch.frombuffer(seq_slots, dtype=torch.int32)
    return slots if lens is None else torch.repeat_interleave(slots, lens, output_size=int(lens.sum()))
