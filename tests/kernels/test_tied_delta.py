"""A tied projection's delta added by the op that consumes its output (cpu/tied_delta.h):
SiLU · up of the gate/up output, the residual add (+ RMSNorm) of the o / down output.

The truth is float64 from the ops' own stored inputs: h = y + s · B · N · (y[:r] − b) per tied
token, from the bf16/fp32 values of y, N, B and the bias as the pools hold them, then the
consumer's maths on h. The fused ops carry h in fp32 without rounding it to y's dtype, so they
meet the consumer's own tolerance against that truth (one rounding of the output in bf16); and
y itself, the projection's output, must come back bit for bit unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_native import fused_case

# fp32: the delta's fp32 sums (r ≤ 128 terms) and the consumer's few ulps; bf16: the output's rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
DTYPES = (torch.float32, torch.bfloat16)


def adapted_rows(y: torch.Tensor, sites, batch, widths) -> torch.Tensor:
    """float64 [T, Σ widths]: y plus every tied token's delta, from the stored inputs."""
    h = y.double().clone()
    offs = [sum(widths[:m]) for m in range(len(widths))]
    for t, s in enumerate(batch.tok_tied_slot.tolist()):
        if s < 0:
            continue
        for m, site in enumerate(sites):
            if site is None:
                continue
            n = site.n_pool[s].double()  # [R, R], zero past the slot's rank
            r = n.shape[0]
            z = y[t, offs[m]:offs[m] + r].double()
            if site.tied_bias is not None:
                z = z - site.tied_bias[:r].double()
            b = site.tied_b[:, :r].double()  # [w, R]
            h[t, offs[m]:offs[m] + widths[m]] += float(batch.slot_scalings[s]) * (b @ (n @ z))
    return h


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def ops(native_ops, monkeypatch):
    """The native ops with the bf16 tied plans on the FMA path (the one a consumer can take)."""
    monkeypatch.setattr(native_ops, "amx", False)
    return native_ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 7, 8, 9, 64, 300))  # around TIED_CHUNK; 64+ on every thread
@pytest.mark.parametrize("dist", ("distinct", "with_none", "none"))
def test_silu_mul_adds_the_gate_up_delta(ops, dtype, rows, dist):
    widths = (1536, 1536)
    y, sites, batch, _ = fused_case(1000 + rows, rows, 576, widths, (16,), dist, dtype, num_used=min(rows, 64))
    before = y.clone()
    tied = ops.tied_delta(ops.tied_step(batch), ops.plan(sites, list(widths)))
    out = ops.layer.silu_mul(y, tied)
    h = adapted_rows(y, sites, batch, widths)
    ref = F.silu(h[:, :1536]) * h[:, 1536:]
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert torch.equal(y, before), "the projection's output was changed"
    plain = batch.tok_tied_slot < 0  # rows without a tied slot: exactly the op without a delta
    assert torch.equal(out[plain], ops.layer.silu_mul(y)[plain])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", ((1,), (7, 16), (64,), (128,)), ids=str)
def test_silu_mul_ranks_one_module_adapted_strided_rows(ops, dtype, ranks):
    """Only the up module adapted (gate's columns get no delta), rows a column slice of a wider buffer."""
    widths = (1536, 1536)
    y, sites, batch, _ = fused_case(1100 + max(ranks), 37, 576, widths, ranks, "zipf", dtype, skip=(0,), row_pad=64)
    assert y.stride(0) == 3072 + 64
    out = ops.layer.silu_mul(y, ops.tied_delta(ops.tied_step(batch), ops.plan(sites, list(widths))))
    h = adapted_rows(y, sites, batch, widths)
    assert rel_err(out, F.silu(h[:, :1536]) * h[:, 1536:]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 9, 64, 300))
@pytest.mark.parametrize("bias", (False, True))
def test_add_rms_norm_adds_the_o_delta(ops, dtype, rows, bias):
    y, sites, batch, _ = fused_case(1200 + rows, rows, 576, (576,), (16, 4), "with_none", dtype, bias=bias,
                                    num_used=min(rows, 64))
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen) * 3
    w = torch.rand(576, generator=gen) + 0.5
    before = y.clone()
    h = x.double() + adapted_rows(y, sites, batch, (576,))
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    out = ops.layer.add_rms_norm(x, y, w, 1e-5, dtype, ops.tied_delta(ops.tied_step(batch), ops.plan(sites, [576])))
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(x, h) < 1e-6  # the residual stream holds x + y + delta in fp32
    assert torch.equal(y, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 9, 64, 300))
def test_add_is_the_residual_add_of_the_down_output_and_its_delta(ops, dtype, rows):
    y, sites, batch, _ = fused_case(1300 + rows, rows, 576, (576,), (16,), "with_none", dtype, num_used=min(rows, 64))
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    want = x.double() + adapted_rows(y, sites, batch, (576,))
    assert ops.layer.add(x, y, ops.tied_delta(ops.tied_step(batch), ops.plan(sites, [576]))) is x
    assert rel_err(x, want) < 1e-6
    plain = torch.randn(rows, 576)
    ref = plain.double() + y.double()
    ops.layer.add(plain, y)  # without a delta: the plain residual add
    assert rel_err(plain, ref) < 1e-7


def test_a_delta_for_another_output_is_refused(ops):
    y, sites, batch, _ = fused_case(1400, 12, 576, (576,), (16,), "distinct", torch.float32)
    tied = ops.tied_delta(ops.tied_step(batch), ops.plan(sites, [576]))
    with pytest.raises(ValueError, match="tied delta is for a \\[12, 576\\]"):
        ops.layer.silu_mul(torch.zeros(12, 1152), tied)
    with pytest.raises(ValueError, match="tied delta is for"):
        ops.layer.add(torch.zeros(12, 576), y.to(torch.bfloat16), tied)
    with pytest.raises(ValueError, match="needs the projection output"):
        ops.layer.add_rms_norm(torch.zeros(12, 576), None, torch.ones(576), 1e-5, torch.float32, tied)


def test_an_amx_plan_gives_no_deferred_delta(native_ops, monkeypatch):
    """The AMX plan's B^T is packed for tiles: its projection keeps the tied op itself."""
    monkeypatch.setattr(native_ops, "amx", True)
    y, sites, batch, _ = fused_case(1500, 12, 576, (576,), (16,), "distinct", torch.bfloat16)
    plan = native_ops.plan(sites, [576])
    assert plan.amx and native_ops.tied_delta(native_ops.tied_step(batch), plan) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 9, 64, 300))
@pytest.mark.parametrize("bias", (False, True))  # Qwen2's q/k/v bias: z = y − b
def test_rope_adds_the_qkv_delta_to_the_whole_row(ops, dtype, rows, bias):
    """q/k/v of the default model's shape (9 q, 3 k, 3 v heads of 64): the delta goes into every
    column, then q and k rotate; v comes back adapted, rounded once."""
    from nlora_serve.engine.model.rope import rope_tables

    widths = (576, 192, 192)
    y, sites, batch, _ = fused_case(1600 + rows, rows, 576, widths, (16, 4), "with_none", dtype, bias=bias,
                                    num_used=min(rows, 64))
    h = adapted_rows(y, sites, batch, widths)
    cos, sin = rope_tables(64, 4096, {"rope_type": "default", "rope_theta": 100000.0})
    positions = torch.randint(0, 4096, (rows,), generator=torch.Generator().manual_seed(rows))
    qk_ref = h[:, :768].view(rows, 12, 64)
    c, s = cos[positions].double().unsqueeze(1), sin[positions].double().unsqueeze(1)
    rotated = qk_ref * c + torch.cat((qk_ref[..., 32:], qk_ref[..., :32]), -1) * s
    plain = batch.tok_tied_slot < 0
    before_plain = y[plain].clone()
    qk = y[:, :768].view(rows, 12, 64)
    tied = ops.tied_delta(ops.tied_step(batch), ops.plan(sites, list(widths)))
    assert ops.layer.rope(qk, positions, cos, sin, tied) is qk
    assert rel_err(qk, rotated) < TOL[dtype]
    assert rel_err(y[:, 768:], h[:, 768:]) < TOL[dtype]  # v: adapted, not rotated
    expected_plain = before_plain.clone()  # rows without a slot: exactly the plain rotation
    ops.layer.rope(expected_plain[:, :768].view(-1, 12, 64), positions[plain], cos, sin)
    assert torch.equal(y[plain], expected_plain)


def test_rope_refuses_a_delta_of_other_rows(ops):
    from nlora_serve.engine.model.rope import rope_tables

    y, sites, batch, _ = fused_case(1700, 12, 576, (576, 192, 192), (16,), "distinct", torch.float32)
    tied = ops.tied_delta(ops.tied_step(batch), ops.plan(sites, [576, 192, 192]))
    cos, sin = rope_tables(64, 64, {"rope_type": "default", "rope_theta": 100000.0})
    narrow = torch.zeros(12, 768)  # rows 768 wide: the delta's 960 columns do not fit
    with pytest.raises(ValueError, match="rope: the tied delta is for a \\[12, 960\\]"):
        ops.layer.rope(narrow.view(12, 12, 64), torch.zeros(12, dtype=torch.int64), cos, sin, tied)
