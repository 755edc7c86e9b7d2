"""PackedLinear (oneDNN-prepacked CPU GEMMs) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlora_serve.kernels.cpu_gemm import MIN_ROWS_FP32, PackedLinear, can_prepack

# fp32: oneDNN's blocked accumulation order differs from float64's; bf16: one rounding of the
# output (2^-8 relative) over fp32 accumulation, as F.linear in bf16
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
needs_bf16 = pytest.mark.skipif(not can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                reason="this CPU has no native bf16 dot products (oneDNN refuses bf16 packing)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("rows", [1, MIN_ROWS_FP32 - 1, MIN_ROWS_FP32, 64, 333])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(dtype, rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=gen).to(dtype)
    b = torch.randn(200, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    out = PackedLinear(w, b)(x)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (rows, 200)
    assert rel_err(out, ref) < TOL[dtype]


def test_packed_linear_strided_and_empty_inputs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=gen)
    packed = PackedLinear(w, None)
    wide = torch.randn(40, 96, generator=gen)
    x = wide[:, ::2]  # a non-contiguous view, as the attention output's slices can be
    assert rel_err(packed(x), F.linear(x.double(), w.double())) < TOL[torch.float32]
    assert packed(torch.empty(0, 48)).shape == (0, 64)


def test_packed_linear_reads_its_own_copy():
    """Prepacking copies W: later writes to the plain tensor do not reach the packed GEMM (the
    engine never writes base weights; adapters add their deltas to the output)."""
    w = torch.ones(32, 16)
    packed = PackedLinear(w, None)
    w.zero_()
    assert torch.equal(packed(torch.ones(16, 16)), torch.full((16, 32), 16.0))


@pytest.mark.parametrize("weight", [torch.zeros(4, 4, dtype=torch.float16), torch.zeros(4, dtype=torch.float32),
                                    torch.zeros(4, 4, dtype=torch.float64)])
def test_refuses_what_onednn_cannot_take(weight):
    assert not can_prepack(weight)
    with pytest.raises(ValueError, match="cannot prepack"):
        PackedLinear(weight, None)

