"""The CUDA path: the Triton ops composed per site (DESIGN §4)."""

from __future__ import annotations

import torch

from nlora_serve.kernels.triton_ops.bgmv_expand import bgmv_expand
from nlora_serve.kernels.triton_ops.bgmv_shrink import bgmv_shrink
from nlora_serve.kernels.triton_ops.per_token_batch import PerTokenAdapterBatch
from nlora_serve.kernels.triton_ops.grouped_expand import grouped_expand
from nlora_serve.kernels.triton_ops.grouped_shrink import grouped_shrink
from nlora_serve.kernels.metadata import AdapterBatch
from nlora_serve.kernels.triton_ops.mix import mix
from nlora_serve.kernels.triton_ops.sgmv_expand import sgmv_expand
from nlora_serve.kernels.triton_ops.sgmv_shrink import sgmv_shrink
from nlora_serve.kernels.triton_ops.tied_expand import tied_expand
from nlora_serve.kernels.triton_ops.tied_fused import tied_fused
from nlora_serve.kernels.weights import KernelSiteWeights

# The tied path's form, decode and prefill alike: "two_launch" (mix reading z from y, then an
# expand by W[:, :R]: per token (BGMV) at decode, over same-slot runs (SGMV) at prefill), "tiled"
# (the same mix, then tied_expand.py: one W[:, :R] tile per block of tokens, any tenant mix) or
# "fused" (tied_fused.py: one launch recomputing z from x). The GPU bench
# (bench/adapter_kernels.py) times all three; flip after measuring. Callers may pass ``tied_form``.
TIED_FORM = "two_launch"
TIED_FORMS = ("two_launch", "tiled", "fused")

# The group (LoRA / family) path's form, decode and prefill alike: "grouped" (grouped_shrink.py then
# grouped_expand.py over family-sorted blocks of tokens: each A and B tile read once per block of
# its tokens, mixed ranks at their own rank) or "bgmv" (the earlier form: per token at decode, each
# token re-reading its A and B; at prefill SGMV over same-slot / same-family runs). The GPU bench
# (bench/adapter_kernels.py: family64 / lora8 against family64_grouped / lora8_grouped) times both.
GROUP_FORM = "grouped"
GROUP_FORMS = ("grouped", "bgmv")

# Runs shorter than one 16-row tl.dot tile (decode) take the per-token BGMV shrink instead.
_SGMV_MIN_RUN = 16


def apply_triton(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch,
                 site: KernelSiteWeights, tied_form: str | None = None, group_form: str | None = None) -> torch.Tensor:
    """Triton form of :func:`nlora_serve.kernels.torch_ops.apply_torch` (same semantics).

    Semantics: for every token t with slot s = batch.token_slots[t] ≥ 0 and r = batch.max_rank:
    y[t] += scaling[s] · B · N[s][:r, :r] · z, where a group token (family f =
    batch.tok_group_family[t] ≥ 0) has z = A[f][:r] · x[t] and B = b_pool[f][:, :r], and a tied
    token has z = (y[t] − tied_bias)[:r] read before any add (tied_bias 0 when None) and
    B = tied_b[:, :r] (the "fused" tied form recomputes z = W[:r] x instead: equal in exact
    arithmetic); scaling[s] = batch.slot_scalings[s]. Rows of slot −1 are untouched; y is
    changed in place, no other argument is. Accumulation is fp32, and u = N z crosses launches
    in an fp32 [T, r] buffer whatever y's dtype.

    Args:
        y: [T, out] fp32, bf16 or fp16, CUDA (CPU only under TRITON_INTERPRET=1); may be a column
            view of a fused output.
        x: [T, in] the projection's input, y's dtype.
        batch: the step's :class:`AdapterBatch`, its tensors on y's device.
        site: this projection's :class:`KernelSiteWeights` (n_pool [S, R, R]; a_pool [F, R, in] and
            b_pool [F, out, R] for group tokens; tied_b [out, ≥r], tied_bias [≥r] or None for
            tied tokens), y's dtype, on y's device.
        tied_form, group_form: see :data:`TIED_FORM`, :data:`GROUP_FORM`.

    Launches: tied path = mix (z read from y into an fp32 buffer) then, after every other add,
    one expand by W[:, :r] (``tied_form``, default :data:`TIED_FORM`: "two_launch" SGMV over
    tied runs, "tiled" :func:`tied_expand` over token blocks; "fused": one :func:`tied_fused`
    launch instead); group path (``group_form``, default :data:`GROUP_FORM`) = "grouped": shrink
    with the mix fused then expand, both over family-sorted token blocks at each slot's own rank;
    "bgmv": shrink with the mix fused (SGMV over same-slot runs, BGMV per token when runs are
    short) then one expand over same-family runs. y in place.

    Raises:
        ValueError: an unknown ``tied_form`` or ``group_form``, or "fused" on a site without ``tied_a``.
    """
    if batch.is_empty:
        return y
    r, num = batch.max_rank, batch.num_tokens
    n_pool = site.n_pool
    u_tied = None
    form = _tied_form(tied_form, site, r) if batch.num_tied else None
    if form == "fused":
        tied_fused(x, site.tied_a, site.tied_b, n_pool, batch.tok_tied_slot, y, r, batch.slot_scalings)
    elif batch.num_tied:
        # Copy z out of y first: the expands below write into the same columns.
        u_tied = mix(y, n_pool, batch.tok_tied_slot, _buffer(y, num, r), site.tied_bias)
    if batch.num_group and _group_form(group_form) == "grouped":
        u = grouped_shrink(x, site.a_pool, n_pool, batch.group_order, batch.group_key, batch.tok_group_slot,
                           _buffer(y, num, r), batch.slot_ranks)
        grouped_expand(u, site.b_pool, batch.group_order, batch.group_key, batch.tok_group_slot, y,
                       batch.slot_scalings, batch.slot_ranks)
    elif batch.num_group:
        u = _buffer(y, num, r)
        if batch.max_seg_len >= _SGMV_MIN_RUN:
            sgmv_shrink(x, site.a_pool, batch.slot_families, batch.seg_start, batch.seg_len,
                        batch.seg_slot, batch.max_seg_len, u, n_pool)
        else:
            bgmv_shrink(x, site.a_pool, batch.tok_group_family, u, n_pool, batch.tok_group_slot)
        sgmv_expand(u, site.b_pool, batch.fseg_start, batch.fseg_len, batch.fseg_family,
                    batch.max_fseg_len, batch.tok_group_slot, batch.slot_scalings, y)
    if u_tied is not None and form == "tiled":
        tied_expand(u_tied, site.tied_b, batch.tok_tied_slot, y, batch.slot_scalings)
    elif u_tied is not None:
        sgmv_expand(u_tied, site.tied_b[None], batch.tseg_start, batch.tseg_len, None,
                    batch.max_tseg_len, batch.tok_tied_slot, batch.slot_scalings, y)
    return y


def apply_triton_per_token(y: torch.Tensor, x: torch.Tensor, batch: PerTokenAdapterBatch,
                           site: KernelSiteWeights, tied_form: str | None = None,
                           group_form: str | None = None) -> torch.Tensor:
    """The fixed-grid form for decode steps and CUDA graphs (same semantics as :func:`apply_triton`).

    Semantics: :func:`apply_triton`'s, with r = batch.rank (the pool's width: entries past a
    slot's own rank are zero), tied tokens those with batch.tok_tied_slot[t] ≥ 0, group tokens
    those with batch.tok_group_slot[t] ≥ 0 and family batch.tok_group_family[t]; every other row
    untouched; y changed in place, no other argument.

    Args:
        y: [T, out] fp32, bf16 or fp16 on the GPU (CPU only under TRITON_INTERPRET=1); may be a
            column view of a fused output.
        x: [T, in] y's dtype.
        batch: this pool's :class:`PerTokenAdapterBatch` ([T] int32 per-token keys, [S] float32
            slot_scalings, on y's device).
        site: as :func:`apply_triton`'s (tied_b [out, ≥R] for a pool with tied slots; a_pool
            and b_pool for one with family slots).
        tied_form, group_form: see :data:`TIED_FORM`, :data:`GROUP_FORM`.

    Launches, each with a grid of the token count (and output column blocks) only: tied path =
    mix (z read from y) then, after the group adds, one BGMV expand by W[:, :R] (``tied_form``
    "tiled": one :func:`tied_expand` over token blocks instead); group path (``group_form``,
    default :data:`GROUP_FORM`) = "grouped": :func:`grouped_shrink` (mix fused) then
    :func:`grouped_expand` over family-sorted token blocks (``batch.group_order``, sorted on the
    device), grids of the token count and column blocks; "bgmv": BGMV shrink with the mix fused,
    then one BGMV expand by each token's B. ``tied_form`` (default
    :data:`TIED_FORM`) "fused" runs the tied path as one launch instead (:func:`tied_fused`,
    z = x · W[:R]ᵀ recomputed, needs ``site.tied_a``). Which paths launch is the
    pool's fact (``has_tied`` / ``has_group``), never the step's; tokens of the other path, or of
    no adapter, are skipped inside the kernels. Nothing is read back to the host. y in place.

    Raises:
        ValueError: the site lacks a pool the batch's paths need, the rank does not fit it, or
            ``tied_form`` / ``group_form`` is not one of :data:`TIED_FORMS` / :data:`GROUP_FORMS`.
    """
    r, num = batch.rank, batch.num_tokens
    form = _tied_form(tied_form, site, r) if batch.has_tied else None
    if batch.has_tied and (site.tied_b is None or site.tied_b.shape[1] < r):
        raise ValueError(f"tied path needs tied_b [out, ≥{r}]")
    if batch.has_group and (site.a_pool is None or site.b_pool is None):
        raise ValueError("group path needs a_pool and b_pool")
    u_tied = None
    if batch.has_tied and form == "fused":  # reads x and W only: order against the adds is free
        tied_fused(x, site.tied_a, site.tied_b, site.n_pool, batch.tok_tied_slot, y, r, batch.slot_scalings)
    elif batch.has_tied:
        u_tied = mix(y, site.n_pool, batch.tok_tied_slot, _buffer(y, num, r), site.tied_bias)
    if batch.has_group and _group_form(group_form) == "grouped":
        if batch.group_order is None:
            raise ValueError("the grouped form needs the batch's group_order (derive_per_token_batch with has_group)")
        u = grouped_shrink(x, site.a_pool, site.n_pool, batch.group_order, batch.group_key, batch.tok_group_slot,
                           _buffer(y, num, r), batch.slot_ranks)
        grouped_expand(u, site.b_pool, batch.group_order, batch.group_key, batch.tok_group_slot, y,
                       batch.slot_scalings, batch.slot_ranks)
    elif batch.has_group:
        u = _buffer(y, num, r)
        bgmv_shrink(x, site.a_pool, batch.tok_group_family, u, site.n_pool, batch.tok_group_slot)
        bgmv_expand(u, site.b_pool, batch.tok_group_family, batch.tok_group_slot, y, batch.slot_scalings)
    if u_tied is not None and form == "tiled":
        tied_expand(u_tied, site.tied_b, batch.tok_tied_slot, y, batch.slot_scalings)
    elif u_tied is not None:
        bgmv_expand(u_tied, site.tied_b[None], None, batch.tok_tied_slot, y, batch.slot_scalings)
    return y


def _tied_form(tied_form: str | None, site: KernelSiteWeights, rank: int) -> str:
    """The tied form to run (``tied_form`` or :data:`TIED_FORM`), checked against the site."""
    form = TIED_FORM if tied_form is None else tied_form
    if form not in TIED_FORMS:
        raise ValueError(f"tied_form must be one of {TIED_FORMS}, got {form!r}")
    if form == "fused" and (site.tied_a is None or site.tied_a.shape[0] < rank):
        raise ValueError(f"the fused tied form needs tied_a = W[:R] [≥{rank}, in]")
    return form


def _group_form(group_form: str | None) -> str:
    """The group form to run (``group_form`` or :data:`GROUP_FORM`), checked."""
    form = GROUP_FORM if group_form is None else group_form
    if form not in GROUP_FORMS:
        raise ValueError(f"group_form must be one of {GROUP_FORMS}, got {form!r}")
    return form


def _buffer(y: torch.Tensor, num: int, rank: int) -> torch.Tensor:
    """[T, r] fp32 intermediate: keeps u exact to fp32 whatever y's dtype."""
    return torch.empty(num, rank, dtype=torch.float32, device=y.device)
