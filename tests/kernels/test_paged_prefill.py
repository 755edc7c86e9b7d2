"""The native CPU prefill attention (kernels/cpu/paged_prefill.c) against a float64 truth.

Each chunk's truth is computed here per query token and head from the context's rows gathered
by hand, with the causal limit written out (token r of a chunk of q_len after `cached` positions
sees positions 0 .. cached + r), independently of the kernel's tiles, spans and online softmax.
"""

from __future__ import annotations

import pytest
import torch

DTYPES = (torch.float32, torch.bfloat16)
# relative Frobenius error against float64: fp32 arithmetic, and bf16 inputs widened exactly with
# the output rounded once (2^-9 relative)
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def make_case(seed, chunks, heads, block_size, dtype, decodes=0):
    """(q, kv, tables, starts, ctx_lens, block lists): ``chunks`` [(q_len, cached)]; q's rows
    0 .. decodes - 1 belong to no chunk (a step's decode tokens). Cache rows outside every
    context are NaN, so a read past a context shows in the output."""
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [q_len + cached for q_len, cached in chunks]
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 3
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    blocks, used = [], 0
    for c in ctx_lens:
        n = -(-c // block_size)
        blocks.append(order[used:used + n])
        used += n
        for p in range(c):
            kv[:, blocks[-1][p // block_size], p % block_size] = torch.randn(
                2, num_kv_heads, head_dim, generator=gen).to(dtype)
    width = max(len(b) for b in blocks) + 1  # one padding column, never read
    tables = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
    starts = [decodes]
    for q_len, _ in chunks:
        starts.append(starts[-1] + q_len)
    # q rows strided (a column slice of a fused q/k/v output), as the engine hands them over
    q = torch.randn(starts[-1], num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)[:, :num_heads]
    return q, kv, tables, torch.tensor(starts), torch.tensor(ctx_lens), blocks


def truth(q, kv, blocks, starts, ctx_lens, scale):
    """[T, H, D] float64; rows outside every chunk stay 0."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape[0], num_heads, head_dim, dtype=torch.float64)
    for c, table in enumerate(blocks):
        start, end, ctx = int(starts[c]), int(starts[c + 1]), int(ctx_lens[c])
        cached = ctx - (end - start)
        rows = [(table[p // block_size], p % block_size) for p in range(ctx)]
        keys = torch.stack([kv[0, b, o] for b, o in rows]).double()  # [ctx, KVH, D]
        values = torch.stack([kv[1, b, o] for b, o in rows]).double()
        for r in range(end - start):
            seen = cached + r + 1
            for i in range(num_heads):
                w = torch.softmax(keys[:seen, i // group] @ q[start + r, i].double() * scale, dim=0)
                out[start + r, i] = w @ values[:seen, i // group]
    return out


def rel_err(out, want, rows):
    return float((out[rows].double() - want[rows]).norm() / want[rows].norm())


# (q_len, cached prefix) per chunk: single tokens, chunks inside and across the kernel's 32-token
# tiles, a cached prefix ending mid-block, and one context past a 512-position staging span
CHUNKS = [(1, 0), (5, 0), (33, 0), (16, 16), (40, 9), (1, 70), (64, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", ((9, 3, 64), (4, 4, 128), (16, 1, 32), (8, 2, 256), (5, 5, 16)), ids=str)
@pytest.mark.parametrize("block_size", (1, 7, 16))
def test_paged_prefill_matches_float64(native_ops, dtype, heads, block_size):
    q, kv, tables, starts, ctx_lens, blocks = make_case(block_size * 100 + heads[0], CHUNKS, heads, block_size,
                                                        dtype, decodes=3)
    scale = heads[2] ** -0.5
    want = truth(q, kv, blocks, starts, ctx_lens, scale)
    rows = slice(int(starts[0]), int(starts[-1]))
    out = torch.empty(q.shape, dtype=dtype)
    for threads in (1, 3):
        out.fill_(float("nan"))
        native_ops.attention.prefill(q, kv, tables, starts, ctx_lens, scale, out, threads)
        assert rel_err(out, want, rows) <= TOL[dtype], threads
        assert out[:3].isnan().all()  # the decode rows before the chunks: untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_context_crosses_staging_spans(native_ops, dtype):
    """A 600-token chunk after a 450-token prefix: keys staged in three spans of 512 positions."""
    q, kv, tables, starts, ctx_lens, blocks = make_case(7, [(600, 450)], (4, 2, 64), 16, dtype)
    out = torch.empty(q.shape, dtype=dtype)
    native_ops.attention.prefill(q, kv, tables, starts, ctx_lens, 0.125, out, 2)
    want = truth(q, kv, blocks, starts, ctx_lens, 0.125)
    assert rel_err(out, want, slice(0, 600)) <= TOL[dtype]


def test_thread_count_does_not_change_a_bit(native_ops):
    """Each (chunk, kv head, tile) item runs the same arithmetic whichever job takes it."""
    q, kv, tables, starts, ctx_lens, _ = make_case(3, CHUNKS, (9, 3, 64), 16, torch.bfloat16)
    outs = []
    for threads in (1, 2, 5):
        out = torch.empty(q.shape, dtype=q.dtype)
        native_ops.attention.prefill(q, kv, tables, starts, ctx_lens, 0.125, out, threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_one_token_chunks_equal_the_decode_op(native_ops):
    """A chunk of one token after c - 1 cached positions is a decode step: same values as paged_decode."""
    chunks = [(1, c - 1) for c in (1, 17, 40, 129)]
    q, kv, tables, starts, ctx_lens, _ = make_case(5, chunks, (9, 3, 64), 16, torch.float32)
    prefill, decode = torch.empty(q.shape), torch.empty(q.shape)
    native_ops.attention.prefill(q, kv, tables, starts, ctx_lens, 0.125, prefill, 2)
    native_ops.attention.decode(q, kv, tables.long(), ctx_lens, 0.125, decode, 2)
    torch.testing.assert_close(prefill, decode, rtol=1e-5, atol=1e-6)


def test_paged_prefill_refuses_what_it_cannot_take(native_ops):
    q, kv, tables, starts, ctx_lens, _ = make_case(1, [(4, 0), (3, 2)], (4, 2, 64), 16, torch.float32)
    out = torch.zeros(q.shape)
    with pytest.raises(ValueError, match="longer than its context"):
        native_ops.attention.prefill(q, kv, tables, starts, torch.tensor([3, 5]), 0.125, out)
    with pytest.raises(ValueError, match="int32 block_tables"):
        native_ops.attention.prefill(q, kv, tables.long(), starts, ctx_lens, 0.125, out)
    with pytest.raises(ValueError, match="contiguous"):
        native_ops.attention.prefill(q.to(torch.bfloat16), kv, tables, starts, ctx_lens, 0.125, out)
    odd = torch.zeros(7, 4, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        native_ops.attention.prefill(odd, torch.zeros(2, 4, 16, 2, 24), tables, starts, ctx_lens, 0.125, odd.clone())
