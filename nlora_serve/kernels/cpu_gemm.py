"""Base GEMMs on the CPU with weights prepacked once for oneDNN (issue 22).

``F.linear`` on the CPU hands oneDNN (or MKL) the plain ``[out, in]`` weight, which it reorders
into its blocked layout on every call; at decode's small token counts that reorder is a large
part of the call. Reordering once at load, as vLLM-cpu and torch.compile's CPU freezing pass do,
measured 1.2-1.4× (fp32) and 1.6-2.4× (bf16, AVX512-BF16/AMX) on the default model's decode
shapes at 64 tokens, and even at 2,048 (``bench/cpu_gemm.py``; numbers in bench/RESULTS.md).

The plain weight stays where it was: adapters read slices of it (the tied path's W[:, :r]) and
the lm_head is the embedding table. The packed copy costs one more copy of the base weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its blocked layout for this many rows; any row count runs with it (the decode
# batch sizes we serve, 1-256, measured equal between hints 64 and 2048)
BATCH_HINT = 64
# below this many rows float32 stays on F.linear: a single row ran 0.5-0.8x packed (a GEMV, which
# MKL's plain path handles better); bf16 gains at every row count
MIN_ROWS_FP32 = 8


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked here: a CPU float32 or bfloat16 tensor, with oneDNN
    built into torch and, for bfloat16, a CPU that has native bf16 dot products."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class PackedLinear:
    """``y = x @ W.T (+ b)`` with ``W`` reordered once into oneDNN's blocked layout.

    Args:
        weight: ``[out, in]`` float32 or bfloat16 CPU tensor (see :func:`can_prepack`); copied.
        bias: ``[out]`` in the weight's dtype, or None.
    Raises:
        ValueError: a weight :func:`can_prepack` refuses.
    """

    __slots__ = ("weight", "packed", "bias", "min_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if not can_prepack(weight):
            raise ValueError(f"cannot prepack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                             f"{weight.device} for oneDNN (CPU float32/bfloat16 2-D weights only)")
        self.weight = weight  # the plain weight (a reference, not a copy) for the rows F.linear does better
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.to(weight.dtype).contiguous()
        self.min_rows = MIN_ROWS_FP32 if weight.dtype == torch.float32 else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, in] in the weight's dtype -> ``[T, out]`` in the same dtype."""
        if x.shape[0] < self.min_rows:  # also the empty input, which oneDNN refuses
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

