"""Paged decode and prefill attention (Triton, under TRITON_INTERPRET=1) against the float64
torch reference, and the reference against SDPA over unpaged keys and values.

Every cache block a case does not fill, every slot past a context inside a used block, padded
block-table entries (pointing at a NaN block), the outputs and the decode workspace start as
NaN: a kernel that reads or keeps anything it should not gives NaN. Small shapes, fixed seeds.
With NLORA_TEST_DEVICE=cuda (conftest.py) the kernels run compiled on the GPU; the references
stay on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import TEST_DEVICE
from nlora_serve.kernels import reference_attention as ref
from nlora_serve.kernels.triton_ops.paged_decode_attention import (decode_num_splits, decode_workspace_numel,
                                                        paged_decode_attention)
from nlora_serve.kernels.triton_ops.paged_prefill_attention import paged_prefill_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
NAN = float("nan")
# (query heads per KV head, KV heads, head_dim, block_size): GQA 1, 3 (SmolLM2: 9/3, 64), 4
SHAPES = ((3, 3, 64, 16), (1, 2, 64, 16), (4, 2, 128, 16), (3, 1, 64, 8))


def paged_cache(seed, context_lens, num_kv_heads, head_dim, block_size, dtype):
    """A NaN cache with each sequence's context written to its own random blocks.

    Returns (kv_layer [2, NB, BS, KVH, D], block_tables [S, B] int32). Table rows are padded
    with the id of a never-written (NaN) block; the blocks of a sequence are shuffled.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    width = max(need) + 1  # one padded entry at least for every sequence
    num_blocks = sum(need) + 3
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype)
    ids = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays NaN: the pad
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for s, (c, nb) in enumerate(zip(context_lens, need)):
        tables[s, :nb] = ids[used: used + nb].to(torch.int32)
        used += nb
        pos = torch.arange(c)
        blocks = tables[s, pos // block_size].long()
        kv[:, blocks, pos % block_size] = torch.randn(2, c, num_kv_heads, head_dim, generator=gen).to(dtype)
    return kv, tables


def dev(*tensors):
    return tuple(t.to(TEST_DEVICE) for t in tensors)


def rel_err(got, want):
    got = got.cpu()
    assert not torch.isnan(got).any(), "NaN leaked into an output row"
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "g{}-kvh{}-d{}-bs{}".format(*s))
@pytest.mark.parametrize("num_splits", (1, 4))
def test_decode_against_float64(num_splits, shape, dtype):
    group, num_kv_heads, head_dim, block_size = shape
    context_lens = [1, 15, 16, 17, 97, 331] if num_splits > 1 else [1, 16, 17, 53]
    kv, tables = paged_cache(len(context_lens) + head_dim, context_lens, num_kv_heads, head_dim,
                             block_size, dtype)
    n, heads = len(context_lens), group * num_kv_heads
    q = torch.randn(n, heads, head_dim, generator=torch.Generator().manual_seed(7)).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    workspace = torch.full((decode_workspace_numel(n, heads, head_dim, num_splits),), NAN)
    out, workspace = dev(torch.full_like(q, NAN), workspace)
    got = paged_decode_attention(*dev(q, kv, tables, lens), head_dim ** -0.5, out, num_splits, workspace)
    want = ref.paged_decode_attention(q.double(), kv.double(), tables, lens, head_dim ** -0.5,
                                      torch.zeros(q.shape, dtype=torch.float64))
    assert rel_err(got, want) <= TOL[dtype]


def test_decode_splits_of_a_long_context_and_strided_rows():
    # 16 splits of a 700-token context (11 tiles: some splits empty), q rows strided as in the
    # engine's packed [T, H, D] view of a fused qkv output, int64 tables and lengths.
    kv, tables = paged_cache(3, [700, 2, 129], 3, 64, 16, torch.float32)
    (qkv,) = dev(torch.randn(3, 15 * 64, generator=torch.Generator().manual_seed(1)))
    q = qkv[:, : 9 * 64].view(3, 9, 64)
    lens = torch.tensor([700, 2, 129])
    got = paged_decode_attention(q, *dev(kv, tables.long(), lens), 0.125, torch.full_like(q, NAN), 16)
    q = q.cpu()
    want = ref.paged_decode_attention(q.double(), kv.double(), tables, lens, 0.125,
                                      torch.zeros(q.shape, dtype=torch.float64))
    assert rel_err(got, want) <= TOL[torch.float32]


def test_decode_num_splits_depends_only_on_max_model_len():
    assert [decode_num_splits(n) for n in (1, 512, 513, 2048, 8192, 131072)] == [1, 1, 2, 4, 16, 16]
    with pytest.raises(ValueError, match="max_model_len"):
        decode_num_splits(0)


# (query length, context length) per sequence: plain prefills (q = c) of lengths 1, 15, 16, 17
# and a prime, chunks after a cached prefix (q < c) ending mid-block and past several blocks.
PREFILL_BATCHES = {
    "fresh": ((1, 1), (15, 15), (16, 16), (17, 17), (37, 37)),
    "chunked": ((16, 49), (5, 300), (1, 50), (23, 23), (33, 64)),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "g{}-kvh{}-d{}-bs{}".format(*s))
@pytest.mark.parametrize("batch", sorted(PREFILL_BATCHES))
def test_prefill_against_float64(batch, shape, dtype):
    group, num_kv_heads, head_dim, block_size = shape
    query_lens, context_lens = zip(*PREFILL_BATCHES[batch])
    kv, tables = paged_cache(11 + head_dim, context_lens, num_kv_heads, head_dim, block_size, dtype)
    lead = 3  # rows of other tokens (decodes) before the chunks: never written
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()]) + lead
    total = int(starts[-1])
    q = torch.randn(total, group * num_kv_heads, head_dim,
                    generator=torch.Generator().manual_seed(5)).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    (out,) = dev(torch.full_like(q, NAN))
    got = paged_prefill_attention(*dev(q, kv, starts, lens, tables), max(query_lens),
                                  head_dim ** -0.5, out).cpu()
    want = ref.paged_prefill_attention(q.double(), kv.double(), starts, lens, tables, 0,
                                       head_dim ** -0.5, torch.zeros(q.shape, dtype=torch.float64))
    assert torch.isnan(got[:lead]).all(), "a row outside every chunk was written"
    assert rel_err(got[lead:], want[lead:]) <= TOL[dtype]


@pytest.mark.parametrize("group", (1, 3, 4))
def test_reference_against_sdpa_on_unpaged_keys(group):
    # The reference's paging and causal positions against SDPA over contiguous K/V: one
    # sequence of 45 tokens, its last 13 as the chunk (decode = its last token alone).
    c, q_len, kv_heads, d = 45, 13, 2, 16
    kv, tables = paged_cache(21, [c], kv_heads, d, 8, torch.float64)
    keys, values = ref._context(kv, tables[0], c)  # [KVH, c, D]
    q = torch.randn(q_len, group * kv_heads, d, dtype=torch.float64)
    mask = torch.arange(c).unsqueeze(0) <= torch.arange(c - q_len, c).unsqueeze(1)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                          scale=0.3, enable_gqa=True).transpose(0, 1)
    got = ref.paged_prefill_attention(q, kv, torch.tensor([0, q_len]), torch.tensor([c]), tables,
                                      q_len, 0.3, torch.zeros_like(q))
    torch.testing.assert_close(got, sdpa, rtol=1e-12, atol=1e-12)
    # the positions really come from the table: the i-th key is block tables[i // 8] row i % 8
    assert torch.equal(keys[:, 20], kv[0, int(tables[0, 2]), 4])
    last = ref.paged_decode_attention(q[-1:], kv, tables, torch.tensor([c]), 0.3, torch.zeros_like(q[-1:]))
    torch.testing.assert_close(last, sdpa[-1:], rtol=1e-12, atol=1e-12)


def test_launchers_reject_bad_inputs():
    kv, tables = paged_cache(0, [5], 3, 64, 16, torch.float32)
    q, lens = torch.randn(1, 9, 64), torch.tensor([5])
    with pytest.raises(TypeError, match="kv_layer"):
        paged_decode_attention(q, kv.bfloat16(), tables, lens, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 8, 64), kv, tables, lens, 1.0, torch.empty(1, 8, 64))
    with pytest.raises(ValueError, match="workspace"):
        paged_decode_attention(q, kv, tables, lens, 1.0, torch.empty_like(q), 2, torch.empty(10))
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, kv, tables, lens, 1.0, torch.empty_like(q), 0)
    with pytest.raises(ValueError, match="query_starts"):
        paged_prefill_attention(q, kv, torch.tensor([0]), lens, tables, 1, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.cat([kv, kv], dim=3)[:, :, :, :3]  # right shape, heads not contiguous
        paged_prefill_attention(q, strided, torch.tensor([0, 1]), lens, tables, 1, 1.0,
                                torch.empty_like(q))
