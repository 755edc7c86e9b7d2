"""A step's per-token adapter layout derived on the device, for fixed-grid (BGMV-style) launches.

On the Triton backend (CUDA) decode steps take this form, and so do prefill and mixed steps of up
to ``AdapterHook.per_token_tokens`` tokens (the ones piecewise CUDA graphs replay). :func:`~nlora_serve.
kernels.metadata.build_adapter_batch` sorts tokens and finds runs on the host (what the SGMV
kernels of larger prefills need). The per-token form needs none of it: every op below runs one
program per token (and column block), or per block of family-sorted tokens (the grouped form),
so from the per-token slot tensor on the device a few elementwise ops and one sort give each
token's tied slot, group slot and family and the family-sorted order: no segments, no host value
read back, no device sync, and launch grids that depend on the token count alone. That is what
lets a CUDA graph captured once replay for any assignment of tenants to sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.kernels.metadata import TIED, sort_group_tokens


@dataclass(slots=True)
class PerTokenAdapterBatch:
    """One pool's view of a step for :func:`~nlora_serve.kernels.triton_ops.triton_path.apply_triton_per_token`.

    The host facts (``rank``, ``has_tied``, ``has_group``) belong to the pool, not to the step's
    tokens, so the launches they pick are the same every step. Tensors live on the activations'
    device; build it with :func:`derive_per_token_batch`.
    """

    token_slots: torch.Tensor  # [T] int32: N-pool slot of each token, −1 = not on this pool
    tok_tied_slot: torch.Tensor  # [T] int32: slot if the token's slot is Nyström-tied, else −1
    tok_group_slot: torch.Tensor  # [T] int32: slot if its slot has an A/B family, else −1
    tok_group_family: torch.Tensor  # [T] int32: that family (A/B pool row), else −1
    slot_scalings: torch.Tensor  # [S] float32 on the device: scaling per slot
    rank: int  # R: the pool's rank width (entries beyond a slot's own rank are zero)
    has_tied: bool  # the pool has tied slots: launch the tied path (mix + expand by W[:, :R])
    has_group: bool  # the pool has family slots: launch the group path (shrink+mix, expand)
    # the grouped form's layout (metadata.sort_group_tokens), when has_group; else None
    group_order: torch.Tensor | None = None  # [T] int32: token at each family-sorted position
    group_key: torch.Tensor | None = None  # [T] int32: family there, NO_GROUP_KEY past the group tokens
    # [S] int32 on the device: each slot's own rank, so the grouped kernels skip the pool width
    # beyond it; None: every slot at the pool's width ``rank``
    slot_ranks: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def derive_per_token_batch(token_slots: torch.Tensor, slot_families: torch.Tensor, slot_scalings: torch.Tensor,
                           rank: int, has_tied: bool, has_group: bool,
                           slot_ranks: torch.Tensor | None = None) -> PerTokenAdapterBatch:
    """Per-token keys from per-token slots, with elementwise device ops and one sort only.

    Semantics: f = slot_families[max(slot, 0)]; tok_tied_slot = slot where slot ≥ 0 and f = TIED,
    tok_group_slot = slot and tok_group_family = f where slot ≥ 0 and f ≥ 0; −1 elsewhere; with
    ``has_group`` also the family-sorted order (:func:`~nlora_serve.kernels.metadata.sort_group_tokens`).

    Args:
        token_slots: [T] int32 on the device, −1 = no adapter of this pool.
        slot_families: [S] int32 and slot_scalings: [S] float32, on the same device.
        rank, has_tied, has_group: the pool's facts (see :class:`PerTokenAdapterBatch`).
        slot_ranks: [S] int32 on the same device, or None (see :class:`PerTokenAdapterBatch`).

    Raises:
        ValueError: a tensor is on another device or has the wrong dtype or rank. Slot values
            are not checked (that would read them back: a sync); the host checked them.
    """
    device = token_slots.device
    for name, t, dtype in (("token_slots", token_slots, torch.int32), ("slot_families", slot_families, torch.int32),
                           ("slot_scalings", slot_scalings, torch.float32), ("slot_ranks", slot_ranks, torch.int32)):
        if t is not None and (t.dim() != 1 or t.dtype != dtype or t.device != device):
            raise ValueError(f"{name} must be a 1-D {dtype} tensor on {device}; got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    adapted = token_slots >= 0
    fam = slot_families.index_select(0, token_slots.clamp(min=0))
    none = torch.full_like(token_slots, -1)
    is_group = adapted & (fam >= 0)
    tok_group_family = torch.where(is_group, fam, none)
    order, key = sort_group_tokens(tok_group_family) if has_group else (None, None)
    return PerTokenAdapterBatch(
        token_slots=token_slots, tok_tied_slot=torch.where(adapted & (fam == TIED), token_slots, none),
        tok_group_slot=torch.where(is_group, token_slots, none), tok_group_family=tok_group_family,
        slot_scalings=slot_scalings, rank=rank, has_tied=has_tied, has_group=has_group,
        group_order=order, group_key=key, slot_ranks=slot_ranks)
