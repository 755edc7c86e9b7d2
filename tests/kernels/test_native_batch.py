"""The native ops' lean step metadata (kernels/cpu/batch.py) against the full builder's fields.

build_adapter_batch is the reference: every field the native ops read must hold the same values,
for random layouts of tied, group and base tokens over shared and single-slot families.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlora_serve.kernels.metadata import TIED, build_adapter_batch
from nlora_serve.kernels.cpu.batch import build_native_batch

FIELDS = ("token_slots", "slot_scalings", "tok_tied_slot", "tok_group_slot", "tok_group_family", "group_index")


@st.composite
def layouts(draw):
    num_slots = draw(st.integers(1, 12))
    families = draw(st.lists(st.sampled_from([TIED, 0, 1, 2, 5]), min_size=num_slots, max_size=num_slots))
    ranks = draw(st.lists(st.integers(1, 64), min_size=num_slots, max_size=num_slots))
    slots = draw(st.lists(st.integers(-1, num_slots - 1), max_size=80))
    return (torch.tensor(slots, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32),
            torch.rand(num_slots, generator=torch.Generator().manual_seed(len(slots))) + 0.5,
            torch.tensor(families, dtype=torch.int32))


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_same_values_as_the_full_batch(layout):
    full, lean = build_adapter_batch(*layout), build_native_batch(*layout)
    for name in FIELDS:
        want, got = getattr(full, name), getattr(lean, name)
        assert torch.equal(got.to(want.dtype), want), name
    for name in ("num_tokens", "max_rank", "num_tied", "num_group", "is_empty"):
        assert getattr(lean, name) == getattr(full, name), name


def test_group_tokens_sorted_by_family_stably():
    slots = torch.tensor([3, -1, 0, 2, 1, 3, 0], dtype=torch.int32)
    families = torch.tensor([4, TIED, 1, 4], dtype=torch.int32)  # slots 0 and 3 share family 4
    lean = build_native_batch(slots, torch.tensor([8, 8, 8, 8]), torch.ones(4), families)
    # family 1: token 3 (slot 2); family 4: tokens 0, 2, 5, 6 in batch order; token 4 is tied
    assert lean.group_index.tolist() == [3, 0, 2, 5, 6]
    assert lean.tok_tied_slot.tolist() == [-1, -1, -1, -1, 1, -1, -1]
    assert (lean.num_tied, lean.num_group) == (1, 5)


def test_bad_slot_is_refused_with_its_range():
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        build_native_batch(torch.tensor([0, 4]), torch.ones(4, dtype=torch.int32), torch.ones(4),
                           torch.zeros(4, dtype=torch.int32))
