"""The engine's Triton attention (engine/model/attention/cuda.py) on one mixed step, run by the Triton
interpreter on CPU tensors, against the CPU attention (engine/model/attention/cpu.py) in float64.

Here rather than in tests/engine: the kernels must be decorated for the interpreter, which this
folder's conftest arranges before any kernel module is imported. With NLORA_TEST_DEVICE=cuda
the Triton path runs compiled on the GPU, its step inputs moved there as the engine would.
"""

import dataclasses

import pytest
import torch

from kernel_cases import TEST_DEVICE

from nlora_serve.engine.model.attention import cpu
from nlora_serve.engine.model.attention import cuda
from nlora_serve.engine.model.batch_info import build_batch_info

NAN = float("nan")
BLOCK_SIZE = 16
# (query tokens this step, context after it): four decodes (contexts 1, 17, 40 and 333, the last
# over three KV splits), a fresh prefill, and two chunks after a cached prefix.
DEVICE_FIELDS = ("query_starts", "context_lens", "slot_mapping", "block_tables")
STEP = ((1, 1), (1, 17), (1, 40), (1, 333), (23, 23), (16, 53), (5, 300))


def step_inputs(group, num_kv_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // BLOCK_SIZE) for _, c in STEP]
    num_blocks = sum(need) + 8
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for i, nb in enumerate(need):
        extra = i % 2  # some tables hold a block ahead of the context, as the block manager may
        tables.append(ids[used: used + nb + extra])
        used += nb + extra
    shape = (2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    kv = torch.randn(shape, generator=gen, dtype=torch.float64)
    prefix = torch.zeros(shape[1:3], dtype=torch.bool)  # slots holding an earlier step's K/V
    for (q, c), table in zip(STEP, tables):
        for p in range(c - q):
            prefix[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = True
    tokens = sum(q for q, _ in STEP)
    q = torch.randn(tokens, group * num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, tokens, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
    return tables, kv, prefix, q, k, v


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("group,num_kv_heads,head_dim", ((3, 3, 64), (4, 2, 128)))
def test_mixed_decode_and_chunked_prefill_step_matches_cpu_attention(group, num_kv_heads, head_dim,
                                                                     dtype):
    tables, kv, prefix, q, k, v = step_inputs(group, num_kv_heads, head_dim)
    info = build_batch_info([s[0] for s in STEP], [s[1] for s in STEP], tables, [True] * len(STEP),
                            BLOCK_SIZE, decode_splits=4)
    assert info.num_decodes == 4 and info.max_query_len == 23
    kv = kv.to(dtype).double()  # the reference sees the values the kernels see
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    want_kv = kv.clone()
    want = cpu.paged_attention(q, k, v, want_kv, info, head_dim ** -0.5)  # float64
    # the Triton path's cache: NaN in every slot no step has written (unused blocks, slots past a
    # context, the block ahead): the kernels must never read them
    poisoned = kv.to(dtype).masked_fill(~prefix[None, :, :, None, None], NAN)
    on_device = dataclasses.replace(info, **{f: getattr(info, f).to(TEST_DEVICE) for f in DEVICE_FIELDS})
    poisoned = poisoned.to(TEST_DEVICE)
    got = cuda.paged_attention(*(t.to(dtype).to(TEST_DEVICE) for t in (q, k, v)), poisoned, on_device,
                               head_dim ** -0.5).cpu()
    poisoned = poisoned.cpu()
    assert got.shape == want.shape and got.dtype == dtype
    assert not torch.isnan(got).any()
    err = float((got.double() - want).norm() / want.norm())
    assert err <= {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    written = prefix.clone()
    written.view(-1)[info.slot_mapping] = True  # the step's own K/V landed where cpu.py puts them
    assert torch.equal(poisoned.double()[:, written], want_kv[:, written])


def test_batch_info_block_tables_for_every_sequence():
    info = build_batch_info([1, 1, 4, 2], [5, 20, 4, 40], [[7], [3, 9], [2], [4, 5, 6]],
                            [True, True, True, False], 16, decode_splits=2)
    assert info.block_tables.dtype == torch.int32
    assert info.block_tables.tolist() == [[7, 0, 0], [3, 9, 0], [2, 0, 0], [4, 5, 6]]
    assert (info.max_query_len, info.decode_splits, info.num_decodes) == (4, 2, 2)
    empty = build_batch_info([1], [3], [[8]], [True], 16)
    assert (empty.max_query_len, empty.decode_splits, tuple(empty.block_tables.shape)) == (0, 1, (1, 1))
