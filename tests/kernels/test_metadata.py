"""The batch metadata against a plain per-token scan, and its input checks."""

import pytest
import torch

from kernel_cases import draw_slots
from nlora_serve.kernels import NO_ADAPTER, TIED, build_adapter_batch


def scan_runs(keys, keep):
    """Runs of consecutive kept tokens with equal key, by a Python loop (the independent truth)."""
    runs, prev = [], None
    for t, (k, ok) in enumerate(zip(keys, keep)):
        if ok and prev == k and runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1][1] += 1
        elif ok:
            runs.append([t, 1, k])
        prev = k if ok else None
    return runs


def facts(num_slots, gen):
    ranks = torch.randint(1, 65, (num_slots,), generator=gen)
    scal = torch.rand(num_slots, generator=gen)
    fams = torch.randint(-1, 3, (num_slots,), generator=gen)  # TIED or one of three families
    return ranks, scal, fams


@pytest.mark.parametrize("dist", ("distinct", "one", "zipf", "skewed", "with_none", "none"))
@pytest.mark.parametrize("num_tokens", (1, 5, 67, 509))
def test_runs_and_paths_match_a_token_scan(num_tokens, dist):
    gen = torch.Generator().manual_seed(num_tokens * 7 + len(dist))
    ranks, scal, fams = facts(9, gen)
    slots = draw_slots(gen, num_tokens, 9, dist)
    b = build_adapter_batch(slots, ranks, scal, fams)
    fam = [int(fams[s]) if s >= 0 else None for s in slots.tolist()]
    group = [f is not None and f >= 0 for f in fam]
    tied = [f == TIED for f in fam]
    assert [list(r) for r in zip(b.seg_start.tolist(), b.seg_len.tolist(), b.seg_slot.tolist())] \
        == scan_runs(slots.tolist(), group)
    assert [list(r) for r in zip(b.fseg_start.tolist(), b.fseg_len.tolist(),
                                 b.fseg_family.tolist())] == scan_runs(fam, group)
    assert [[s, n] for s, n in zip(b.tseg_start.tolist(), b.tseg_len.tolist())] \
        == [r[:2] for r in scan_runs([0] * num_tokens, tied)]
    assert b.num_tied == sum(tied) and b.num_group == sum(group)
    assert sorted(b.group_index.tolist()) == [t for t in range(num_tokens) if group[t]]
    # Padded layout: each group token sits in its family's row, and pads feed real tokens only.
    assert len(set(b.group_pad_pos.tolist())) == b.num_group
    if b.num_group:
        rows = b.group_families[b.group_pad_pos // b.group_pad_len]
        assert rows.tolist() == [fam[t] for t in b.group_index.tolist()]
        assert b.group_pad_src[b.group_pad_pos].tolist() == b.group_index.tolist()
        assert all(group[t] for t in b.group_pad_src.tolist())
    used = [s for s in slots.tolist() if s >= 0]
    assert b.max_rank == (max(int(ranks[s]) for s in used) if used else 0)
    assert b.is_empty == (not used)
    one = len(set(slots.tolist())) == 1 and used
    assert b.single_slot == (used[0] if one else NO_ADAPTER)


def test_uniform_scaling_and_per_token_scalings():
    slots = torch.tensor([2, -1, 0, 2, 1])
    b = build_adapter_batch(slots, torch.tensor([4, 8, 4]), torch.tensor([0.5, 2.0, 0.5]),
                            torch.tensor([TIED, 0, TIED]))
    assert b.uniform_scaling is None
    assert b.tied_index.tolist() == [0, 2, 3] and b.tied_scalings.flatten().tolist() == [0.5] * 3
    same = build_adapter_batch(slots, torch.tensor([4, 8, 4]), torch.tensor([0.5, 0.5, 0.5]),
                               torch.tensor([TIED, 0, TIED]))
    assert same.uniform_scaling == 0.5


@pytest.mark.parametrize("slots,match", [
    (torch.tensor([0, 3]), "token_slots must lie in"),
    (torch.tensor([-2, 0]), "token_slots must lie in"),
    (torch.tensor([[0]]), "1-D"),
])
def test_bad_inputs_are_refused(slots, match):
    with pytest.raises(ValueError, match=match):
        build_adapter_batch(slots, torch.tensor([4, 4, 4]), torch.ones(3), torch.zeros(3))


def test_mismatched_slot_facts_are_refused():
    with pytest.raises(ValueError, match="slot_scalings must have shape"):
        build_adapter_batch(torch.tensor([0]), torch.tensor([4, 4]), torch.ones(3),
                            torch.zeros(2))
