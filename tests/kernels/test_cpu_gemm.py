"""The CPU base GEMMs against float64: PackedLinear (oneDNN-prepacked) and NativeLinear (ours,
cpu/gemm.c)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlora_serve.kernels.cpu.gemm import MIN_ROWS_FP32, NativeLinear, PackedLinear, can_prepack

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



# Our kernel (cpu/gemm.c, NativeLinear): fp32 products summed in fp32 (a different order from
# float64's); bf16 products exact, fp32 sums, the output rounded once
@pytest.fixture
def gemm(native_ops):
    if not native_ops.gemm.supports(torch.float32):
        pytest.skip("this CPU has no AVX-512: the native GEMM is off and oneDNN serves every call")
    return native_ops.gemm


# (rows, out, in): blocks of 8 rows and panels of 48 columns, with partial ones; an odd `in`
# (the bf16 pair padded); one column; the default model's q/k/v at decode and a prefill-sized call
# that splits rows over the jobs
SHAPES = [(1, 48, 16), (7, 100, 33), (9, 49, 1), (13, 5, 7), (3, 1, 2), (64, 960, 576), (600, 97, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_linear_matches_float64(gemm, dtype, shape):
    if not gemm.supports(dtype):
        pytest.skip(f"this build runs no {dtype} GEMM")
    rows, out_features, in_features = shape
    gen = torch.Generator().manual_seed(rows * 7 + in_features)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype)
    x = torch.randn(rows, in_features + 5, generator=gen).to(dtype)[:, 3:3 + in_features]  # strided rows
    for bias in (None, b):
        out = NativeLinear(w, bias, gemm)(x)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert out.dtype == dtype and out.shape == (rows, out_features)
        assert rel_err(out, ref) < TOL[dtype], bias is not None


def test_native_linear_threads_and_row_counts(gemm):
    """The same bits on 1 and 3 threads (each output element's sum runs in one order whichever job
    owns it); prefill-sized calls (rows split over the jobs) within the float64 tolerance."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(200, 96, generator=gen)
    lin = NativeLinear(w, None, gemm)
    saved = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(lin(torch.ones(70, 96) * torch.arange(96) / 96))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1])
    for rows in (511, 512, 2049):
        x = torch.randn(rows, 96, generator=gen)
        assert rel_err(lin(x), F.linear(x.double(), w.double())) < TOL[torch.float32]
    assert lin(torch.empty(0, 96)).shape == (0, 200)
    x = torch.randn(40, 192, generator=gen)[:, ::2]  # strided columns: copied first
    assert rel_err(lin(x), F.linear(x.double(), w.double())) < TOL[torch.float32]


def test_native_linear_refuses_what_it_cannot_take(gemm):
    lin = NativeLinear(torch.zeros(8, 4), None, gemm)
    with pytest.raises(ValueError, match=r"x must be \[T, 4\]"):
        lin(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="x must be"):
        lin(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot take"):
        NativeLinear(torch.zeros(8, 4, dtype=torch.float16), None, gemm)


def test_native_gemm_refuses_an_x_or_out_that_does_not_fit_the_packed_weight(gemm):
    """The launcher itself checks x against the packed weight: a wrong K read past the packed
    panels, a float64 x ran as float32 (neither raised before)."""
    w = torch.randn(48, 33, generator=torch.Generator().manual_seed(5))  # [N, K] float32
    packed = gemm.pack(w)
    out = torch.empty(2, 48)
    for x in (torch.randn(2, 34), torch.randn(2, 32), torch.randn(2, 33, dtype=torch.float64), torch.randn(33, 2).t()):
        with pytest.raises(ValueError, match=r"x must be a CPU \[M, 33\] torch.float32 tensor with contiguous columns"):
            gemm(x, packed, out)
    for bad in (torch.empty(2, 47), torch.empty(3, 48), torch.empty(2, 48, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"out must be a CPU \[2, 48\] torch.float32 tensor"):
            gemm(torch.randn(2, 33), packed, bad)
    x = torch.randn(2, 33)
    assert rel_err(gemm(x, packed, out), F.linear(x.double(), w.double())) < TOL[torch.float32]  # the good call runs


def test_bf16_stays_on_onednn_where_amx_tiles_are_granted():
    """On an AMX CPU oneDNN's bf16 GEMMs run on the tiles and ours would not: supports() says no
    for bf16 there, yes for fp32 (a stub library, as this CPU may have no AMX)."""
    from types import SimpleNamespace

    from nlora_serve.kernels.cpu.gemm import NativeGemm

    def fn(value):
        def call(*args):
            return value
        return call

    for amx, bf16 in ((1, False), (0, True)):
        lib = SimpleNamespace(_name="nlora-cpu-stub.so", nlora_gemm_supported=fn(1), nlora_gemm_packed_size=fn(0),
                              nlora_gemm_pack=fn(None), nlora_gemm=fn(0), nlora_amx_init=fn(amx))
        gemm = NativeGemm(lib)
        assert gemm.supports(torch.bfloat16) is bf16 and gemm.supports(torch.float32) is True
