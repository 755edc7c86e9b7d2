"""Step inputs from tensor ops (engine/runner/step_inputs.py): every index checked against numbers worked
out by hand, and the single packed copy checked on a 'device' the test stands in for."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.engine.model.batch_info import build_batch_info
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.runner.step_inputs import StepInputs

BS = 4


def _seq(tokens: list[int], computed: int, table: list[int]) -> Sequence:
    s = Sequence("r", 0, tokens, len(tokens), SamplingParams(max_tokens=4), None)
    s.num_computed_tokens, s.block_table = computed, table
    return s


def _pairs():
    # two decodes (context 6 and 9), then a 3-token chunk at positions 2..4 of a 7-token prompt
    # (does not sample), then a whole 2-token prompt (samples)
    return [(_seq(list(range(100, 106)), 5, [7, 3]), 1), (_seq(list(range(200, 209)), 8, [1, 5, 2]), 1),
            (_seq(list(range(300, 307)), 2, [6, 0]), 3), (_seq([400, 401], 0, [4]), 2)]


def test_layout_equals_hand_computed_numbers():
    ids, pos, info, rows = StepInputs(BS, 2, torch.device("cpu"), gather_layout=True).build(
        _pairs(), [torch.tensor([5, -1, 0, 0, 3, 3, 3], dtype=torch.int32)])
    assert ids.tolist() == [105, 208, 302, 303, 304, 400, 401]
    assert pos.tolist() == [5, 8, 2, 3, 4, 0, 1]
    assert info.query_starts.tolist() == [0, 1, 2, 5, 7]
    assert info.context_lens.tolist() == [6, 9, 5, 2]
    # slot = table[p // 4] * 4 + p % 4: 3*4+1, 2*4+0, 6*4+2, 6*4+3, 0*4+0, 4*4+0, 4*4+1
    assert info.slot_mapping.tolist() == [13, 8, 26, 27, 0, 16, 17]
    assert info.logits_indices.tolist() == [0, 1, 6]  # the chunk stops short of its prompt's end
    assert info.num_decodes == 2 and info.max_query_len == 3 and info.decode_splits == 2
    assert info.block_tables.dtype == torch.int32
    assert info.block_tables.tolist() == [[7, 3, 0], [1, 5, 2], [6, 0, 0], [4, 0, 0]]
    assert info.decode_block_tables.tolist() == [[7, 3, 0], [1, 5, 2]]
    assert info.decode_mask.view(2, -1).sum(1).tolist() == [6, 9]
    assert [(c.start, c.end, c.context_len) for c in info.prefills] == [(2, 5, 5), (5, 7, 2)]
    assert rows[0].tolist() == [5, -1, 0, 0, 3, 3, 3]


def test_build_batch_info_keeps_its_contract():
    info = build_batch_info([1, 1, 3, 2], [6, 9, 5, 2], [[7, 3], [1, 5, 2], [6, 0], [4]],
                            [True, True, False, True], BS)
    assert info.slot_mapping.tolist() == [13, 8, 26, 27, 0, 16, 17]
    assert info.logits_indices.tolist() == [0, 1, 6]
    assert info.prefills[0].mask is not None and info.prefills[1].mask is None


def test_device_layout_is_one_copy_of_one_buffer(monkeypatch):
    """On a non-CPU device the step is one int32 staging buffer copied once; everything the model
    reads is a view of the one device buffer. 'meta' stands in for the GPU (no data, same code)."""
    inputs = StepInputs(BS, 1, torch.device("meta"), gather_layout=False)
    inputs._pinned = False  # pinning needs a CUDA driver
    copies = []
    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: (
        copies.append((self.device.type, src.device.type, non_blocking)), original(self, src))[1])
    ids, pos, info, rows = inputs.build(_pairs(), [torch.zeros(7, dtype=torch.int32)])
    assert copies == [("meta", "cpu", True)]
    assert info.decode_block_tables is None and info.prefills == []
    base = inputs._dev.untyped_storage().data_ptr()
    assert info.block_tables.untyped_storage().data_ptr() == base and rows[0].untyped_storage().data_ptr() == base
    assert ids.dtype == pos.dtype == info.slot_mapping.dtype == torch.int64
    assert ids.shape == (7,) and info.block_tables.shape == (4, 16) and info.logits_indices.shape == (3,)


def test_device_block_tables_are_gathered_padded_not_padded_again(monkeypatch):
    """5967bdf padded the gathered [S, W] tables to 16k columns with F.pad on every device step: a
    second host copy of every table (~0.1 ms a step at 256 sequences of 2,049 blocks); the
    persistent table's rows are gathered 16k wide instead (their tails are zero already)."""
    inputs = StepInputs(BS, 1, torch.device("meta"), gather_layout=False)
    inputs._pinned = False
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: pytest.fail("tables padded in a second copy"))
    info = inputs.build(_pairs(), [torch.zeros(7, dtype=torch.int32)])[2]
    assert info.block_tables.shape == (4, 16)


def test_device_block_tables_start_aligned_with_rows_of_16_blocks():
    """The attention kernels' Triton compile key holds the block tables' 16-byte alignment and row
    stride (1: a constant, 16k: a hint): with the step's own offset (after its int64 rows) and width
    they varied step by step, and each new combination compiled the kernels again mid-serving. On a
    device the tables now start 16-byte aligned, rows padded with block 0 to 16k blocks, so the
    decode rows [:n] and the prefill rows [n:] are alike every step; every value is unchanged."""
    inputs = StepInputs(BS, 1, torch.device("meta"), gather_layout=False)
    inputs._pinned = False
    for pick in (slice(None), slice(1, None), slice(0, 1), slice(2, None)):
        pairs = _pairs()[pick]
        ids, pos = StepInputs(BS, 1, torch.device("cpu"), gather_layout=False).build(_pairs()[pick])[:2]
        _, _, info, rows = inputs.build(pairs, [torch.arange(sum(n for _, n in pairs), dtype=torch.int32)])
        tables, n = info.block_tables, info.num_decodes
        assert tables.shape[1] == 16 and tables.storage_offset() % 4 == 0 and tables[n:].storage_offset() % 4 == 0
        host = inputs._hosts[inputs._turn]  # what the one copy carried: the values on the host
        at, width = tables.storage_offset(), max(len(s.block_table) for s, _ in pairs)
        want = torch.zeros(len(pairs), 16, dtype=torch.int32)
        for i, (s, _) in enumerate(pairs):
            want[i, :len(s.block_table)] = torch.tensor(s.block_table)
        assert torch.equal(host[at:at + tables.numel()].view(tables.shape), want), width
        slots = host[rows[0].storage_offset():rows[0].storage_offset() + rows[0].numel()]
        assert slots.tolist() == list(range(rows[0].numel()))
        assert host[:2 * len(ids)].tolist() == ids.tolist() + pos.tolist()


def test_prompt_rows_follow_the_sampling_rows_worked_out_by_hand(monkeypatch):
    """engine/sample/prompt_logprobs.py's plan on :func:`_pairs` with the chunk (positions 2..4 of 300..306)
    and the 2-token prompt asking for prompt logprobs: the chunk's positions 2, 3, 4 score tokens
    303, 304, 305 (packed 2..4); the whole prompt's position 0 scores 401 (packed 5; position 1 is
    its sampling row). The decodes ask for none."""
    from nlora_serve.engine.sample.prompt_logprobs import mark_scored, plan

    pairs = _pairs()
    pairs[2][0].params = SamplingParams(max_tokens=4, prompt_logprobs=2)
    pairs[3][0].params = SamplingParams(max_tokens=4, prompt_logprobs=0)
    rows = plan(pairs)
    assert rows.indices.tolist() == [2, 3, 4, 5] and rows.targets.tolist() == [303, 304, 305, 401]
    assert [(s is pairs[i][0], n) for (s, n), i in zip(rows.spans, (2, 3))] == [(True, 3), (True, 1)]
    assert rows.top_k == 2
    _, _, info, _ = StepInputs(BS, 1, torch.device("cpu"), gather_layout=True).build(pairs, scored=rows.indices)
    assert info.logits_indices.tolist() == [0, 1, 6, 2, 3, 4, 5]  # sampling rows first, as before
    inputs = StepInputs(BS, 1, torch.device("meta"), gather_layout=False)
    inputs._pinned = False
    assert inputs.build(pairs, scored=rows.indices)[2].logits_indices.shape == (7,)  # in the one copy
    mark_scored(rows)
    assert pairs[2][0].num_prompt_scored == 5 and pairs[3][0].num_prompt_scored == 1
    # recomputed after a preemption with positions 0..3 scored before: only position 4 is scored
    pairs[2][0].num_prompt_scored = 4
    again = plan(pairs[:3])
    assert again.indices.tolist() == [4] and again.targets.tolist() == [305]
    assert plan(pairs[:2]) is None  # decodes only: the step runs as before (graphs included)
