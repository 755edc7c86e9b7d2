"""tests/triton_interpreter.py's fixes of the Triton interpreter's bf16 (applied by conftest.py):
a bf16 ``tl.dot`` and an fp32 -> bf16 cast or store give what a GPU gives, bit for bit (torch's
fp32 matmul of the widened operands; torch's round-to-nearest-even ``.to(torch.bfloat16)``).
Unpatched, the dot multiplies bit patterns and the cast rounds toward zero."""

import torch
import triton
import triton.language as tl

from kernel_cases import TEST_DEVICE


@triton.jit
def _cast_kernel(x_ptr, cast_ptr, stored_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)  # fp32
    tl.store(cast_ptr + offs, x.to(tl.bfloat16))
    tl.store(stored_ptr + offs, x)  # through a bf16 pointer: the store casts


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    offs_m, offs_k, offs_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * N + offs_n[None, :])
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], tl.dot(a, b, out_dtype=tl.float32))


def test_fp32_to_bf16_rounds_to_nearest_even_as_torch():
    gen = torch.Generator().manual_seed(0)
    one_ulp = 2.0 ** -7  # bf16's spacing at 1.0
    special = [1 + one_ulp / 2, 1 + 1.5 * one_ulp, -(1 + one_ulp / 2), 1 + 0.51 * one_ulp,  # ties to even, above
               1 + 0.49 * one_ulp, 3.3895313892515355e38, 3.4028234663852886e38,  # bf16's max; rounds to inf
               float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -3e-39]  # fp32 subnormals
    x = torch.cat([torch.tensor(special), torch.randn(50, generator=gen) * 1e3]).to(TEST_DEVICE)
    cast, stored = (torch.empty(64, dtype=torch.bfloat16, device=TEST_DEVICE) for _ in range(2))
    _cast_kernel[(1,)](x, cast, stored, N=64)
    want = x.to(torch.bfloat16)
    for got in (cast, stored):
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16)), (got, want)


def test_bf16_dot_accumulates_the_widened_operands_in_fp32():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=gen).to(TEST_DEVICE, torch.bfloat16)
    b = torch.randn(32, 16, generator=gen).to(TEST_DEVICE, torch.bfloat16)
    out = torch.empty(16, 16, device=TEST_DEVICE)
    _dot_kernel[(1,)](a, b, out, M=16, K=32, N=16)
    want = a.double() @ b.double()  # exact products; fp32 sums of 32 terms land within ~1e-6
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-6
