"""The step metadata the native CPU ops read, built in a handful of torch ops.

:func:`~nlora_serve.kernels.metadata.build_adapter_batch` computes every layout any backend may
need (torch form, Triton runs, padded group layout): ~40 small torch ops, ~0.8 ms a step in the
engine (bench/RESULTS.md "The tenants' share, op by op"). The native ops
(:class:`~nlora_serve.kernels.cpu.native.NativeOps`) read five of its tensors; this builds just those,
with the same values (tests/kernels/test_native_batch.py checks them against the full builder), so
a CPU step builds the full batch only when some projection falls back to the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.kernels.metadata import TIED, check_inputs

_I32, _I64 = torch.int32, torch.int64


@dataclass(slots=True)
class NativeBatch:
    """What :meth:`NativeOps.tied_apply` / :meth:`NativeOps.group_apply` and a pool's bias read of a
    step; the same fields and values as :class:`~nlora_serve.kernels.metadata.AdapterBatch`'s."""

    token_slots: torch.Tensor  # [T] int32: slot per token, −1 = base only
    slot_scalings: torch.Tensor  # [S] float32
    num_tokens: int  # T
    max_rank: int  # max rank over the slots the step uses (0: none)
    num_tied: int  # tokens on the tied path
    num_group: int  # tokens on the group path
    tok_tied_slot: torch.Tensor  # [T] int32: slot if the token is tied, else −1
    tok_group_slot: torch.Tensor  # [T] int32: slot if the token is a group token, else −1
    tok_group_family: torch.Tensor  # [T] int32: its family if a group token, else −1
    group_index: torch.Tensor  # [num_group] int64: group tokens sorted by family (stable)

    @property
    def is_empty(self) -> bool:
        """True when no token of the step is adapted."""
        return self.num_tied + self.num_group == 0


def build_native_batch(token_slots: torch.Tensor, slot_ranks: torch.Tensor, slot_scalings: torch.Tensor,
                       slot_families: torch.Tensor) -> NativeBatch:
    """The native ops' view of a CPU step.

    Args:
        token_slots: [T] integer CPU tensor, slot per token in batch order, −1 = no adapter.
        slot_ranks: [S] integer, rank per slot. slot_scalings: [S] float. slot_families: [S]
            integer, A/B pool row per slot or :data:`~nlora_serve.kernels.metadata.TIED`.

    Raises:
        ValueError: shapes disagree or a token slot is outside [−1, S) (as build_adapter_batch).
    """
    slots = token_slots.to(_I32)
    families = slot_families.to(_I32)
    check_inputs(slots, slot_ranks, slot_scalings, families)
    adapted = slots >= 0
    safe = slots.clamp(min=0).long()
    fam = torch.where(adapted, families[safe], torch.full_like(slots, -2))
    minus1 = torch.full_like(slots, -1)
    is_tied, is_group = fam == TIED, fam >= 0
    group = torch.where(is_group, fam, minus1)
    num_group = int(is_group.sum())
    index = is_group.nonzero().squeeze(1)
    if num_group:
        index = index[torch.sort(fam[index], stable=True).indices]
    used = safe[adapted]
    return NativeBatch(
        token_slots=slots, slot_scalings=slot_scalings.to(torch.float32), num_tokens=slots.numel(),
        max_rank=int(slot_ranks[used].max()) if used.numel() else 0, num_tied=int(is_tied.sum()),
        num_group=num_group, tok_tied_slot=torch.where(is_tied, slots, minus1),
        tok_group_slot=torch.where(is_group, slots, minus1), tok_group_family=group, group_index=index)
