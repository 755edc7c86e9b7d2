"""The native CPU op of the tied path (kernels/cpu/tied_apply.c) against a float64 truth.

One call covers a whole fused projection (q/k/v, gate/up, ...): every module's delta
s · W_m[:, :r] · N_m[slot] · (y_m[:r] − b_m[:r]) is computed here per token in float64 from the
unrounded base output and the raw per-slot N, independently of the pools and the metadata.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import TOL, draw_slots
from nlora_serve.kernels import TIED, KernelSiteWeights, build_adapter_batch
from nlora_serve.kernels.cpu.native import PARALLEL_MIN_ROWS

DTYPES = (torch.float32, torch.bfloat16)
# the tied op's paths: (dtype, expand on AMX tiles); bf16 runs on AVX-512 and, where the CPU has
# AMX-BF16, on tiles (cpu/amx.h)
PATHS = ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))


@pytest.fixture(params=PATHS, ids=("fp32", "bf16", "bf16-amx"))
def tied_dtype(request, native_ops, monkeypatch):
    """The dtype of a tied-op case, with native_ops set to the path under test."""
    dtype, amx = request.param
    if amx and not native_ops.amx:
        pytest.skip("no AMX-BF16 tiles on this CPU or kernel: its non-AMX bf16 path is the one tested")
    monkeypatch.setattr(native_ops, "amx", amx)
    return dtype


def fused_case(seed, num_tokens, dim_in, widths, ranks, dist, dtype, *, bias=False, skip=(), num_used=None,
               row_pad=0):
    """(y, sites, batch, truth, y_before): y [T, Σ widths] (a column slice of a wider buffer
    when row_pad > 0), free slots NaN-filled, module indices in ``skip`` not adapted."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    num_used = num_used or min(num_tokens, 12)
    num_slots, width = num_used + 3, max(ranks)
    x = rnd(num_tokens, dim_in)
    weights = [rnd(w, dim_in, scale=0.5 * dim_in ** -0.5) for w in widths]
    biases = [rnd(w, scale=0.2) if bias else None for w in widths]
    y_base = torch.cat([x @ w.t() + (0 if b is None else b) for w, b in zip(weights, biases)], dim=1)
    n_pool = torch.full((num_slots, len(widths), width, width), float("nan"), dtype=dtype)
    n_raw = {}
    for slot in range(num_used):
        r = ranks[slot % len(ranks)]
        for m in range(len(widths)):
            n_raw[slot, m] = rnd(r, r, scale=2 * dim_in ** 0.5 / r)  # delta ≈ |y|: see kernel_cases
            n_pool[slot, m].zero_()[:r, :r] = n_raw[slot, m].to(dtype)
    scal = torch.rand(num_slots, generator=gen) + 0.5
    ranks_t = torch.tensor([ranks[s % len(ranks)] for s in range(num_used)] + [1 << 30] * 3)
    slots = draw_slots(gen, num_tokens, num_used, dist)
    truth = torch.zeros(num_tokens, sum(widths), dtype=torch.float64)
    offs = [sum(widths[:m]) for m in range(len(widths))]
    for t in range(num_tokens):
        s = int(slots[t])
        for m, (w, b) in enumerate(zip(weights, biases)):
            if s < 0 or m in skip:
                continue
            r = ranks[s % len(ranks)]
            z = y_base[t, offs[m]:offs[m] + r] - (0 if b is None else b[:r])
            truth[t, offs[m]:offs[m] + widths[m]] = float(scal[s]) * (w[:, :r] @ (n_raw[s, m] @ z))
    wide = torch.full((num_tokens, sum(widths) + row_pad), float("nan"), dtype=dtype)
    y = wide[:, :sum(widths)]
    y.copy_(y_base.to(dtype))
    sites = [None if m in skip else
             KernelSiteWeights(n_pool=n_pool[:, m], tied_b=w.to(dtype)[:, :width],
                         tied_bias=None if b is None else b.to(dtype)[:width])
             for m, (w, b) in enumerate(zip(weights, biases))]
    batch = build_adapter_batch(slots, ranks_t, scal, torch.full((num_slots,), TIED))
    return y, sites, batch, truth


def run(native_ops, y, sites, batch, truth, widths):
    plan = native_ops.plan(sites, list(widths))
    assert plan is not None
    assert plan.amx == (native_ops.amx and y.dtype == torch.bfloat16), "the path under test did not run"
    before = y.clone()
    assert native_ops.tied_apply(y, batch, plan) is y
    assert not torch.isnan(y).any(), "a NaN from a free slot leaked"
    untouched = batch.tok_tied_slot < 0
    assert torch.equal(y[untouched], before[untouched]), "a slot −1 row changed"
    err = (y.double() - before.double() - truth).norm()
    return float(err / truth.norm()) if truth.norm() > 0 else float(err)  # no tied token: exact


@pytest.mark.parametrize("widths", ((576, 192, 192), (576,), (1536, 1536), (577,), (130, 131)), ids=str)
@pytest.mark.parametrize("ranks", ((1,), (7,), (16,), (64,), (128,), (1, 7, 16)), ids=str)
def test_ranks_and_widths(native_ops, ranks, widths, tied_dtype):
    case = fused_case(100 + 7 * len(widths) + max(ranks) + sum(widths), 37, 576, widths, ranks, "zipf", tied_dtype)
    assert run(native_ops, *case, widths) <= TOL[tied_dtype]


@pytest.mark.parametrize("num_tokens", (1, 2, 31, 32, 33, 67, 257))
@pytest.mark.parametrize("dist", ("distinct", "one", "skewed", "with_none"))
def test_token_counts_and_popularity(native_ops, num_tokens, dist, tied_dtype):
    case = fused_case(300 + num_tokens, num_tokens, 576, (576, 192, 192), (16,), dist, tied_dtype,
                      num_used=min(num_tokens, 64))
    assert run(native_ops, *case, (576, 192, 192)) <= TOL[tied_dtype]


def test_bias_skipped_module_and_row_stride(native_ops, tied_dtype):
    """Qwen2-style bias (z = y − b), a module the family does not adapt (its columns untouched),
    and y as a column slice of a wider buffer (row stride > width)."""
    widths = (576, 192, 192)
    y, sites, batch, truth = fused_case(500, 29, 576, widths, (16, 4), "with_none", tied_dtype, bias=True,
                                        skip=(1,), row_pad=40)
    assert y.stride(0) == sum(widths) + 40
    k_cols = y[:, 576:768].clone()
    assert run(native_ops, y, sites, batch, truth, widths) <= TOL[tied_dtype]
    assert torch.equal(y[:, 576:768], k_cols)


def test_no_tied_token_leaves_y_bitwise(native_ops):
    y, sites, batch, truth = fused_case(600, 13, 576, (576,), (16,), "none", torch.bfloat16)
    before = y.clone()
    native_ops.tied_apply(y, batch, native_ops.plan(sites, [576]))
    assert torch.equal(y, before)


@pytest.mark.parametrize("amx", (False, True), ids=("avx512", "amx"))
@pytest.mark.parametrize("ranks", ((16,), (7, 16), (48,)), ids=str)
def test_bf16_rounds_once_from_fp32_arithmetic(native_ops, monkeypatch, amx, ranks):
    """bf16 y: every entry is the float64 sum y + s·B·N·z of the op's own bf16 inputs, rounded once:
    within one bf16 ulp of that sum, plus 2^-12 of the delta's size where y and the delta cancel
    (the AMX path carries u as two bf16 parts, ~2^-16 relative; fp32 u: 2^-24)."""
    if amx and not native_ops.amx:
        pytest.skip("no AMX-BF16 tiles on this CPU or kernel: its non-AMX bf16 path is the one tested")
    monkeypatch.setattr(native_ops, "amx", amx)
    widths = (576, 192, 192)
    y, sites, batch, _ = fused_case(800 + max(ranks), 45, 576, widths, ranks, "zipf", torch.bfloat16)
    before = y.double()
    want = before.clone()
    r, offs = sites[0].n_pool.shape[1], (0, 576, 768)
    for t, s in enumerate(batch.tok_tied_slot.tolist()):
        for m, (off, w) in enumerate(zip(offs, widths)):
            if s < 0:
                continue
            z = before[t, off:off + r]
            u = float(batch.slot_scalings[s]) * (sites[m].n_pool[s].double() @ z)
            want[t, off:off + w] += sites[m].tied_b[:, :r].double() @ u
    native_ops.tied_apply(y, batch, native_ops.plan(sites, list(widths)))
    ulp = want.abs().clamp(min=1e-30).log2().floor().exp2() * 2.0 ** -7  # spacing of bf16 values near want
    bound = ulp + 2.0 ** -12 * (want - before).abs()
    assert bool(((y.double() - want).abs() <= bound).all()), float(((y.double() - want).abs() / bound).max())


def test_plan_refuses_what_it_cannot_serve(native_ops):
    y, sites, batch, _ = fused_case(700, 5, 576, (576,), (16,), "one", torch.float32)
    lora = KernelSiteWeights(n_pool=sites[0].n_pool, a_pool=torch.zeros(2, 16, 576), b_pool=torch.zeros(2, 576, 16))
    assert native_ops.plan([lora], [576]) is None  # group-path pools stay on the torch path
    assert native_ops.plan([None], [576]) is None
    plan = native_ops.plan(sites, [576])
    with pytest.raises(ValueError, match="unit column stride"):
        native_ops.tied_apply(y.t().contiguous().t(), batch, plan)
    with pytest.raises(ValueError, match="float32"):
        native_ops.tied_apply(y.to(torch.bfloat16), batch, plan)


# -- decode attention over the paged KV cache ---------------------------------------------------


def decode_truth(q, kv, tables, ctx_lens, scale):
    """Per sequence and head, in float64: gather the context's rows by hand, softmax, weighted sum."""
    n, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(n, num_heads, head_dim, dtype=torch.float64)
    for s in range(n):
        rows = [(tables[s][p // block_size], p % block_size) for p in range(ctx_lens[s])]
        keys = torch.stack([kv[0, b, o] for b, o in rows]).double()  # [c, KVH, D]
        values = torch.stack([kv[1, b, o] for b, o in rows]).double()
        for i in range(num_heads):
            w = torch.softmax(keys[:, i // group] @ q[s, i].double() * scale, dim=0)
            out[s, i] = w @ values[:, i // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", ((9, 3, 64), (4, 4, 128), (16, 1, 32), (2, 1, 256)), ids=str)
@pytest.mark.parametrize("block_size", (1, 7, 16))
def test_paged_decode_matches_float64(native_ops, dtype, heads, block_size):
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(block_size * 1000 + num_heads)
    ctx_lens = [1, 2, 15, 16, 17, 33, 160, 5, 71, 40, 129]
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 5
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        blocks = -(-c // block_size)
        tables.append(order[used:used + blocks])
        used += blocks
        for p in range(c):  # only the context's rows hold numbers: a read past it yields NaN
            kv[:, tables[-1][p // block_size], p % block_size] = torch.randn(2, num_kv_heads, head_dim,
                                                                             generator=gen).to(dtype)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(ctx_lens), num_heads + 3, head_dim, generator=gen).to(dtype)[:, 2:2 + num_heads]  # strided rows
    out = torch.empty(q.shape, dtype=dtype)
    scale = head_dim ** -0.5
    for threads in (1, 3):
        out.fill_(float("nan"))
        native_ops.attention.decode(q, kv, padded, torch.tensor(ctx_lens), scale, out, threads)
        truth = decode_truth(q, kv, tables, ctx_lens, scale)
        err = float((out.double() - truth).norm() / truth.norm())
        assert err <= {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype], (threads, err)


def test_paged_decode_refuses_shapes_it_cannot_take(native_ops):
    kv = torch.zeros(2, 4, 16, 2, 24)
    q, out = torch.zeros(3, 4, 24), torch.zeros(3, 4, 24)
    tables, lens = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of 16"):
        native_ops.attention.decode(q, kv, tables, lens, 0.2, out)
    with pytest.raises(ValueError, match="contiguous"):
        native_ops.attention.decode(q.to(torch.bfloat16), kv, tables, lens, 0.2, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_matches_index_copy(native_ops, dtype):
    """Rows land where two index_copy_ calls (the torch path) put them, bit for bit; strided k/v
    rows as the engine's views of the fused q/k/v output; every other slot untouched."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, kvh, d, t = 6, 16, 3, 64, 20
    kv = torch.randn(2, num_blocks, block_size, kvh, d, generator=gen).to(dtype)
    qkv = torch.randn(t, (9 + 2 * kvh) * d, generator=gen).to(dtype)  # [T, (H + 2 KVH) D]
    k = qkv[:, 9 * d:(9 + kvh) * d].view(t, kvh, d)
    v = qkv[:, (9 + kvh) * d:].view(t, kvh, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    truth = kv.clone()
    truth[0].view(-1, kvh, d).index_copy_(0, slots, k)
    truth[1].view(-1, kvh, d).index_copy_(0, slots, v)
    native_ops.attention.write_kv(kv, k, v, slots)
    assert torch.equal(kv, truth)


def test_write_kv_refuses_bad_slots_and_layouts_writing_nothing(native_ops):
    kv = torch.zeros(2, 2, 4, 2, 16)
    k = v = torch.ones(3, 2, 16)
    for bad in ([0, 8, 1], [0, -1, 2]):  # 8 = NB · BS: one past the end
        with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
            native_ops.attention.write_kv(kv, k, v, torch.tensor(bad))
        assert not kv.any()  # the valid rows before the bad one were not written either
    with pytest.raises(ValueError, match="contiguous"):
        native_ops.attention.write_kv(kv, k.to(torch.bfloat16), v.to(torch.bfloat16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64"):
        native_ops.attention.write_kv(kv, k, v, torch.tensor([0, 1, 2], dtype=torch.int32))


@pytest.mark.parametrize("threads", (2, 3))
def test_prefill_sized_steps_split_over_threads(native_ops, tied_dtype, threads):
    """≥ PARALLEL_MIN_ROWS tokens run as one call per thread on disjoint rows: the same truth,
    and the same bits as one thread (each token's arithmetic does not depend on the split)."""
    num_tokens = 2 * PARALLEL_MIN_ROWS + 37
    one = fused_case(7, num_tokens, 576, (576, 192, 192), (16,), "with_none", tied_dtype, num_used=64)
    split = [t.clone() if isinstance(t, torch.Tensor) else t for t in one]
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run(native_ops, *one, (576, 192, 192)) <= TOL[tied_dtype]
        torch.set_num_threads(threads)
        assert run(native_ops, *split, (576, 192, 192)) <= TOL[tied_dtype]
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one[0], split[0])
