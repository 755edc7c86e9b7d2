"""The per-module entry of the torch and Triton adapter paths: Triton on CUDA tensors, torch on the CPU.

The adapter layer (engine/model/adapter_layer.py ``AdapterHook``) calls :func:`apply_adapters` on steps
that are not in the per-token Triton form and on projections the native CPU ops do not serve. It
calls the native CPU ops (:class:`~nlora_serve.kernels.cpu.native.NativeOps`) and the per-token form
(:func:`~nlora_serve.kernels.triton_ops.triton_path.apply_triton_per_token`) directly, not through here.
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.metadata import AdapterBatch
from nlora_serve.kernels.torch_ops import apply_torch
from nlora_serve.kernels.weights import KernelSiteWeights


def apply_adapters(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch,
                   site: KernelSiteWeights, backend: str | None = None) -> torch.Tensor:
    """Add this step's adapter deltas into one projection's base output.

    Semantics: for every token t with slot s = batch.token_slots[t] ≥ 0, r = batch.max_rank:
    y[t] += scaling[s] · B · N[s] · z with z = A[f] x[t], B = b_pool[f] for a family f ≥ 0, or
    z = (y[t] − tied_bias)[:r] (the base output's own first r columns) and B = tied_b for a
    Nyström-tied slot. Tokens with slot −1 are untouched; nothing read from a free slot.

    Args:
        y: [T, out] base output, modified in place; may be a column view of a fused output
            (qkv, gate_up) whose first r columns are this module's.
        x: [T, in] the projection input, same dtype (fp32, bf16 or fp16).
        batch: the step's :class:`AdapterBatch` (index tensors on y's device).
        site: this projection's :class:`KernelSiteWeights`, same dtype as y.
        backend: "triton" or "torch"; None picks by device (Triton on CUDA tensors, torch on the
            CPU). "triton" on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported.

    Returns:
        y.

    Raises:
        TypeError: dtypes disagree. ValueError: shapes disagree with each other or the batch,
            or the batch needs a pool the site lacks.
    """
    _check(y, x, batch, site)
    if batch.is_empty:
        return y
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch'; got {backend!r}")
    if backend == "triton" or (backend is None and y.is_cuda):
        from nlora_serve.kernels.triton_ops.triton_path import apply_triton  # Triton only where it runs
        return apply_triton(y, x, batch, site)
    return apply_torch(y, x, batch, site)


def _check(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, site: KernelSiteWeights) -> None:
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0] or x.shape[0] != batch.num_tokens:
        raise ValueError(f"y {tuple(y.shape)} and x {tuple(x.shape)} must be [T, out] / [T, in] "
                         f"with T = {batch.num_tokens} (the batch's tokens)")
    if site.dtypes != {y.dtype} or x.dtype != y.dtype:
        raise TypeError(f"y {y.dtype}, x {x.dtype} and the pools {sorted(map(str, site.dtypes))} "
                        "must share one compute dtype")
    if batch.max_rank > site.rank_width:
        raise ValueError(f"batch rank {batch.max_rank} exceeds the pools' width {site.rank_width}")
    if batch.num_tied and (site.tied_b is None or site.tied_b.shape[0] != y.shape[1]
                           or site.tied_b.shape[1] < batch.max_rank):
        raise ValueError(f"tied tokens need tied_b [out={y.shape[1]}, ≥{batch.max_rank}], got "
                         f"{None if site.tied_b is None else tuple(site.tied_b.shape)}")
    if batch.num_group and (site.a_pool is None or site.a_pool.shape[2] != x.shape[1]
                            or site.b_pool.shape[1] != y.shape[1]):
        raise ValueError(f"group tokens need a_pool [F, R, in={x.shape[1]}] and b_pool "
                         f"[F, out={y.shape[1]}, R]")
