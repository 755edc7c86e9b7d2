"""The native layer ops (kernels/cpu/layer_ops.c) against float64 torch: RMSNorm + residual, RoPE
in place, SiLU · up. fp32 to rounding; bf16 within one rounding of the stored output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlora_serve.engine.model.rope import rope_tables

# fp32: a few ulps of fp32 (polynomial exp, summation order); bf16: the output's own rounding
# (2^-8 relative) plus the inputs' widening being exact
TOL = {torch.float32: 3e-6, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 700])  # 700 x 576 runs on every thread
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(native_ops, dtype, rows, with_delta):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen) * 3
    wide = torch.randn(rows, 2 * 576, generator=gen).to(dtype)
    delta = wide[:, 576:] if with_delta else None  # strided rows, as a fused output's slice
    w = torch.rand(576, generator=gen) + 0.5
    h = x.double() + (delta.double() if with_delta else 0)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    out = native_ops.layer.add_rms_norm(x, delta, w, 1e-5, dtype)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert rel_err(x, h) < 1e-7  # the residual stream now holds x + delta, in fp32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_rope_in_place_on_the_fused_qkv_heads(native_ops, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    cos, sin = rope_tables(64, 4096, {"rope_type": "default", "rope_theta": 100000.0})
    qkv = torch.randn(rows, 15 * 64, generator=gen).to(dtype)  # 9 q + 3 k + 3 v heads
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    v_before = qkv[:, 12 * 64:].clone()
    x = qkv[:, : 12 * 64].double().view(rows, 12, 64)
    c, s = cos[positions].double().unsqueeze(1), sin[positions].double().unsqueeze(1)
    ref = x * c + torch.cat((x[..., 32:], x[..., :32]), -1) * s  # sin's first half is negated
    qk = qkv[:, : 12 * 64].view(rows, 12, 64)
    assert native_ops.layer.rope(qk, positions, cos, sin) is qk
    assert rel_err(qk, ref) < TOL[dtype]
    assert torch.equal(qkv[:, 12 * 64:], v_before)  # v heads untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 200])
def test_silu_mul(native_ops, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=gen) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-200.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0])  # exp's range ends
    g, u = gate_up.double().chunk(2, dim=-1)
    ref = F.silu(g) * u
    out = native_ops.layer.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (rows, 1536)
    assert rel_err(out, ref) < TOL[dtype]


def test_layouts_the_ops_cannot_take_are_refused(native_ops):
    ops = native_ops.layer
    with pytest.raises(ValueError, match="add_rms_norm"):
        ops.add_rms_norm(torch.zeros(2, 20), None, torch.ones(20), 1e-5, torch.float32)  # H % 16
    with pytest.raises(ValueError, match="add_rms_norm"):
        ops.add_rms_norm(torch.zeros(2, 32, dtype=torch.bfloat16), None, torch.ones(32), 1e-5, torch.float32)
    cos = sin = torch.zeros(8, 48)
    with pytest.raises(ValueError, match="rope"):
        ops.rope(torch.zeros(2, 3, 48), torch.zeros(2, dtype=torch.long), cos, sin)  # D % 32
    with pytest.raises(ValueError, match="rope"):
        ops.rope(torch.zeros(2, 3, 64), torch.zeros(2, dtype=torch.int32), torch.zeros(8, 64), torch.zeros(8, 64))
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.zeros(2, 64, dtype=torch.float16))
