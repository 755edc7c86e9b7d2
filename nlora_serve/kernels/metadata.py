"""Per-step batch metadata for the adapter ops (DESIGN §4), and its builder.

`engine/` builds one :class:`AdapterBatch` per pool per forward step from the slot of every token
and that pool's per-slot rank, scaling and family (``slot_ranks``, ``slot_scalings``,
``slot_families`` of adapters/runtime/pool.py), then hands the same object to every adapted
projection (30 layers × 7 projections on the default model). Everything a kernel needs that depends
only on the token layout is computed here once, so no op recomputes it 210 times.

Two index spaces:
- slot: a row of the N pool (``n_pool[slot]``), one per resident tenant version. Token slot −1
  (:data:`NO_ADAPTER`) = base model only, a first-class path.
- family: a row of the shared A/B pools (``a_pool[family]``, ``b_pool[family]``). Tenants that share
  A and B (an IntTune family) share a family row; an untied LoRA/NLoRA adapter is a family of one.
  Family −1 (:data:`TIED`) = Nyström-tied: A = W[:r, :] and B = W[:, :r] of the base weight itself,
  so z is read from the base output and no A is stored at all.

Two paths, chosen per token by its slot's family: the tied path and the group path (family ≥ 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_ADAPTER = -1  # token slot: this token runs the base model only
TIED = -1  # slot family: Nyström-tied to the base weight (DESIGN §1)
NO_GROUP_KEY = 2**31 - 1  # sort key of a token off the group path: it sorts after every family

_I32 = torch.int32
_I64 = torch.int64


@dataclass(slots=True)
class AdapterBatch:
    """What every adapter op of one forward step needs to know about the token layout.

    Build it with :func:`build_adapter_batch`; treat it as read-only. Index tensors live on the
    device of the activations. "group tokens" = adapted tokens whose slot has a family ≥ 0;
    "tied tokens" = adapted tokens whose slot's family is :data:`TIED`. A run ("segment") is a
    maximal stretch of consecutive tokens (in the batch's own order) sharing the stated key.
    """

    # -- inputs, as given by engine/ ----------------------------------------------------------
    token_slots: torch.Tensor  # [T] int32: N-pool slot of each token, NO_ADAPTER = base only
    slot_ranks: torch.Tensor  # [S] int32: rank r of each slot (pool entries beyond r are zero)
    # [S] float32: the kernels' s per slot (y += s · B N A x). The engine's pools (adapters/runtime/pool.py)
    # always pass 1: PEFT's s = alpha / r (or / sqrt(r), rsLoRA) differs per module under
    # rank_pattern / alpha_pattern, which one number per slot cannot hold, so it is folded into N
    slot_scalings: torch.Tensor
    slot_families: torch.Tensor  # [S] int32: A/B pool row of each slot, TIED = Nyström-tied
    # -- whole-batch facts (host ints, so launchers pick a path without a device sync) ------
    num_tokens: int  # T
    max_rank: int  # max rank over the slots this step uses (0 when no token is adapted)
    single_slot: int  # the one slot every token uses, else NO_ADAPTER (fast path)
    uniform_scaling: float | None  # the scaling shared by every adapted token, else None
    # -- tied path, torch form ----------------------------------------------------------------
    num_tied: int  # Tt: tokens on the tied path
    tied_index: torch.Tensor | None  # [Tt] int64 token indices; None when all T tokens are tied
    tied_slots: torch.Tensor  # [Tt] int64: slot of each tied token
    tied_scalings: torch.Tensor  # [Tt, 1] float32: scaling of each tied token
    # -- group path, torch form (tokens sorted by family, padded to L per family) ------------
    num_group: int  # Tg: tokens on the group path
    group_index: torch.Tensor  # [Tg] int64 token indices, sorted by family (stable)
    group_slots: torch.Tensor  # [Tg] int64: slot of each group token, same order
    group_scalings: torch.Tensor  # [Tg, 1] float32: scaling of each group token, same order
    group_families: torch.Tensor  # [G] int64: distinct families of the group tokens, ascending
    group_pad_len: int  # L: tokens of the most popular family
    group_pad_pos: torch.Tensor  # [Tg] int64: position of each group token in the [G * L] layout
    group_pad_src: torch.Tensor  # [G * L] int64: token feeding each padded position (pads repeat
    #                              their family's first token, so padding never reads a NaN)
    group_token_pad_pos: torch.Tensor | None  # [T] int64: when every token is a group token, the
    #                              padded position of token t (the delta is gathered in token order
    #                              and added densely, not scattered by index_add_); else None
    # -- Triton form: per-token keys over all T tokens, and runs --------------------------------
    tok_tied_slot: torch.Tensor  # [T] int32: slot if the token is tied, else −1
    tok_group_slot: torch.Tensor  # [T] int32: slot if the token is a group token, else −1
    tok_group_family: torch.Tensor  # [T] int32: family if the token is a group token, else −1
    seg_start: torch.Tensor  # [Ns] int32: first token of each run of group tokens with one slot
    seg_len: torch.Tensor  # [Ns] int32: its length (tokens)
    seg_slot: torch.Tensor  # [Ns] int32: its slot
    max_seg_len: int  # longest such run (0 when none)
    fseg_start: torch.Tensor  # [Nf] int32: first token of each run of group tokens, one family
    fseg_len: torch.Tensor  # [Nf] int32: its length
    fseg_family: torch.Tensor  # [Nf] int32: its family (the A/B pool row)
    max_fseg_len: int  # longest such run
    tseg_start: torch.Tensor  # [Nt] int32: first token of each run of tied tokens (any slots)
    tseg_len: torch.Tensor  # [Nt] int32: its length
    max_tseg_len: int  # longest such run
    # -- grouped form (grouped_shrink.py / grouped_expand.py): see sort_group_tokens ----------
    group_order: torch.Tensor  # [T] int32: token at each sorted position (group tokens by family)
    group_key: torch.Tensor  # [T] int32: family at each sorted position, NO_GROUP_KEY past the group tokens

    @property
    def is_empty(self) -> bool:
        """True when no token of the step is adapted (the output is the base output)."""
        return self.num_tied + self.num_group == 0


def sort_group_tokens(tok_group_family: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group tokens sorted by family (stable), then every other token: the grouped kernels' layout.

    Semantics: key[t] = tok_group_family[t] if ≥ 0 else :data:`NO_GROUP_KEY`; returns (order, sorted
    key), both [T] int32 on the input's device, with key[order[i]] = sorted_key[i] nondecreasing.
    One device sort, fixed shapes, nothing read back to the host: safe inside a CUDA graph (the
    grouped kernels find each family's rows in a block of sorted positions themselves, so no
    counts, starts or run lengths are needed; vLLM's punica kernels sort the same way).

    Args:
        tok_group_family: [T] int32/int64, −1 = not a group token.
    """
    key = torch.where(tok_group_family >= 0, tok_group_family.to(_I32),
                      torch.full_like(tok_group_family, NO_GROUP_KEY, dtype=_I32))
    sorted_key, order = torch.sort(key, stable=True)
    return order.to(_I32), sorted_key


def _runs(key: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Maximal runs of consecutive tokens with equal ``key``, restricted to ``keep`` tokens.

    Returns (starts [n] int64, lens [n] int64, longest run). Vectorised: one diff, no token loop.
    """
    num = key.numel()
    if num == 0:
        empty = torch.zeros(0, dtype=_I64)
        return empty, empty, 0
    boundary = torch.ones(num, dtype=torch.bool)
    boundary[1:] = (key[1:] != key[:-1]) | (keep[1:] != keep[:-1])
    starts = boundary.nonzero().squeeze(1)
    lens = torch.diff(starts, append=torch.tensor([num]))
    kept = keep[starts]
    starts, lens = starts[kept], lens[kept]
    return starts, lens, int(lens.max()) if lens.numel() else 0


def check_inputs(token_slots, slot_ranks, slot_scalings, slot_families) -> None:
    """Shapes and slot range shared by both step-metadata builders (this one and cpu/batch.py).

    Raises:
        ValueError: token_slots not 1-D, per-slot tables of different lengths, or a slot outside [−1, S).
    """
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    num_slots = slot_ranks.numel()
    for name, t in (("slot_scalings", slot_scalings), ("slot_families", slot_families)):
        if t.shape != (num_slots,):
            raise ValueError(f"{name} must have shape [{num_slots}] like slot_ranks, "
                             f"got {tuple(t.shape)}")
    if token_slots.numel() and (int(token_slots.min()) < NO_ADAPTER
                                or int(token_slots.max()) >= num_slots):
        raise ValueError(f"token_slots must lie in [-1, {num_slots - 1}], got "
                         f"[{int(token_slots.min())}, {int(token_slots.max())}]")


def build_adapter_batch(token_slots: torch.Tensor, slot_ranks: torch.Tensor,
                        slot_scalings: torch.Tensor, slot_families: torch.Tensor,
                        device: torch.device | str | None = None) -> AdapterBatch:
    """Build the step's :class:`AdapterBatch` from per-token slots and per-slot facts.

    Semantics: pure layout bookkeeping; no adapter weight is read.

    Args:
        token_slots: [T] integer, slot per token in batch order, −1 = no adapter.
        slot_ranks: [S] integer, rank per slot (only slots that tokens use are read).
        slot_scalings: [S] float, scaling per slot.
        slot_families: [S] integer, A/B pool row per slot, or TIED.
        device: where the index tensors go (default: token_slots' device). The work itself runs
            on the CPU, once per step: a few dozen small torch ops, no Python loop over tokens.

    Raises:
        ValueError: shapes disagree or a token slot is outside [−1, S).
    """
    device = token_slots.device if device is None else torch.device(device)
    slots = token_slots.detach().to("cpu", _I64)
    ranks = slot_ranks.detach().to("cpu", _I64)
    scalings = slot_scalings.detach().to("cpu", torch.float32)
    families = slot_families.detach().to("cpu", _I64)
    check_inputs(slots, ranks, scalings, families)
    num = slots.numel()
    adapted = slots >= 0
    safe = slots.clamp(min=0)
    fam = torch.where(adapted, families[safe], torch.full_like(slots, -2))
    is_tied, is_group = adapted & (fam == TIED), adapted & (fam >= 0)
    used = slots[adapted]
    tok_scale = scalings[safe]

    tied_idx = is_tied.nonzero().squeeze(1)
    group_idx = is_group.nonzero().squeeze(1)
    group_idx = group_idx[torch.sort(fam[group_idx], stable=True).indices]
    g_fam = fam[group_idx]
    families_used, counts = torch.unique_consecutive(g_fam, return_counts=True)
    pad_len = int(counts.max()) if counts.numel() else 0
    # Position of each sorted group token in a [G, L] layout: its family's row, then its rank
    # within the family (index minus the family's first index).
    first = torch.cumsum(counts, 0) - counts
    fam_row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    pad_pos = fam_row * pad_len + torch.arange(group_idx.numel()) - first[fam_row]
    pad_src = torch.zeros(0, dtype=_I64) if not counts.numel() else \
        group_idx[first].repeat_interleave(pad_len).index_copy_(0, pad_pos, group_idx)

    s_start, s_len, s_max = _runs(slots, is_group)
    f_start, f_len, f_max = _runs(fam, is_group)
    t_start, t_len, t_max = _runs(is_tied.to(_I64), is_tied)
    uniq_scale = torch.unique(tok_scale[adapted])
    minus1 = torch.full_like(slots, -1)
    g_order, g_key = sort_group_tokens(torch.where(is_group, fam, minus1))

    def dev(t: torch.Tensor, dtype: torch.dtype = _I32) -> torch.Tensor:
        if device.type != "cuda":
            return t.to(device=device, dtype=dtype)
        # from pinned memory, non_blocking: a pageable copy synchronizes the stream, and this runs
        # while the step before may still be queued (async scheduling), ~25 times per pool per step
        return t.to(dtype).pin_memory().to(device, non_blocking=True)

    return AdapterBatch(
        token_slots=dev(slots), slot_ranks=dev(ranks), slot_scalings=dev(scalings, torch.float32),
        slot_families=dev(families), num_tokens=num,
        max_rank=int(ranks[used].max()) if used.numel() else 0,
        single_slot=int(slots[0]) if num and bool((slots == slots[0]).all()) and slots[0] >= 0
        else NO_ADAPTER,
        uniform_scaling=float(uniq_scale[0]) if uniq_scale.numel() == 1 else None,
        num_tied=tied_idx.numel(),
        tied_index=None if tied_idx.numel() == num else dev(tied_idx, _I64),
        tied_slots=dev(slots[tied_idx], _I64),
        tied_scalings=dev(tok_scale[tied_idx, None], torch.float32),
        num_group=group_idx.numel(), group_index=dev(group_idx, _I64),
        group_slots=dev(slots[group_idx], _I64),
        group_scalings=dev(tok_scale[group_idx, None], torch.float32),
        group_families=dev(families_used, _I64), group_pad_len=pad_len,
        group_pad_pos=dev(pad_pos, _I64), group_pad_src=dev(pad_src, _I64),
        group_token_pad_pos=dev(torch.empty_like(pad_pos).index_copy_(0, group_idx, pad_pos), _I64)
        if num and group_idx.numel() == num else None,
        tok_tied_slot=dev(torch.where(is_tied, slots, minus1)),
        tok_group_slot=dev(torch.where(is_group, slots, minus1)),
        tok_group_family=dev(torch.where(is_group, fam, minus1)),
        seg_start=dev(s_start), seg_len=dev(s_len), seg_slot=dev(slots[s_start]), max_seg_len=s_max,
        fseg_start=dev(f_start), fseg_len=dev(f_len), fseg_family=dev(fam[f_start]),
        max_fseg_len=f_max, tseg_start=dev(t_start), tseg_len=dev(t_len), max_tseg_len=t_max,
        group_order=dev(g_order), group_key=dev(g_key),
    )
