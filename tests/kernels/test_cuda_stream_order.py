"""Stream-order checks only a GPU can run (bench/gpu_check.sh, step attention_kernels); skipped elsewhere.

- A slot write on the pools' side stream lands after the fill of a pool tensor allocated while the
  engine's stream is busy (adapters/runtime/pool.py ``_Pool._copy_in``): unordered, the zero fill queued
  behind the busy stream ran after the write and erased the adapter.
- The sampling path and build_adapter_batch copy host lists to the device without a stream sync
  (engine/runner/device_values.py, kernels/metadata.py): ``torch.cuda.set_sync_debug_mode("error")``
  turns any synchronizing copy or read-back into an error.
The CPU stand-ins: tests/registry/test_slot_write_order.py, tests/engine/test_no_sync_copies.py,
tests/kernels/test_metadata_copies.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernel_cases import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cuda" or not torch.cuda.is_available(),
                                reason="needs NLORA_TEST_DEVICE=cuda and a GPU")


def test_slot_write_lands_after_the_fill_of_a_table_allocated_behind_a_busy_stream():
    from nlora_serve.adapters.adapter import SiteWeights
    from nlora_serve.adapters.runtime.pool import LoraPool, Placement

    dev, out, inp, r = torch.device("cuda"), 96, 64, 4
    base = SimpleNamespace(dtype=torch.float32, spec=SimpleNamespace(projection_shape=lambda module: (out, inp)))
    gen = torch.Generator().manual_seed(0)
    site = SiteWeights(0, "q_proj", r, 1.0, torch.randn(r, inp, generator=gen), torch.eye(r),
                       torch.randn(out, r, generator=gen))
    adapter = SimpleNamespace(sites={(0, "q_proj"): site})
    pool = LoraPool(base, capacity=2, rank=r, placement=Placement(dev, None, None, torch.cuda.Stream(dev)))
    torch.cuda._sleep(200_000_000)  # the engine's stream busy for ~0.1 s: the tables' zero fill queues behind
    pool.write(1, adapter)
    torch.cuda.synchronize()
    n, a, b = pool.tables[(0, "q_proj")]
    assert torch.equal(a[1, :r].cpu(), site.A) and torch.equal(b[1, :, :r].cpu(), site.B)
    assert torch.equal(n[1].cpu(), torch.eye(r))


def test_sampling_and_adapter_batches_never_sync_the_stream():
    from nlora_serve.engine.sample.sampling import (SamplingParams, add_logit_bias, apply_penalties, ban_before_min_tokens,
                                             sample)
    from nlora_serve.engine.sample.token_masks import keep_allowed
    from nlora_serve.kernels.metadata import TIED, build_adapter_batch

    dev = torch.device("cuda")
    logits = torch.randn(4, 1000, device=dev)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05), SamplingParams(temperature=1.3, seed=5)]
    shared = torch.Generator(dev).manual_seed(0)
    gens = [None, None, None, torch.Generator(dev).manual_seed(5)]
    allowed = torch.arange(10, 50, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        add_logit_bias(logits, [1, 2], [((3, 1.5),), ((7, -2.0), (8, 0.5))])
        ban_before_min_tokens(logits, [0, 3], [{2}, {2, 9}])
        keep_allowed(logits, [2], [allowed])
        # repetition only: frequency / presence count with torch.bincount, which reads its max back on
        # CUDA; such steps read their tokens back before the next launch anyway (needs_values)
        apply_penalties(logits[1], [5, 6, 5, 7], 2, SamplingParams(repetition_penalty=1.2), set())
        tokens = sample(logits, params, gens, shared)
        build_adapter_batch(torch.tensor([0, 0, 1, -1, 2], dtype=torch.int32), torch.tensor([4, 8, 4]),
                            torch.ones(3), torch.tensor([0, 1, TIED], dtype=torch.int32), device=dev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tokens.shape == (4,) and 10 <= int(tokens[2]) < 50
