"""Scored prompt rows in fixed-size chunks (engine/sample/prompt_logprobs.py's ``score``): with the chunk
forced to a few rows, so one step runs many, the values are still transformers' float64 log_softmax,
and no tensor with a vocabulary-sized row holds more than a chunk of rows, however many the step
scores."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from test_prompt_logprobs import PROMPT, chat, check, reference
from nlora_serve.engine.sample.prompt_logprobs import chunk_rows
from nlora_serve.engine.sample.sampling import SamplingParams

VOCAB = 49152  # the default model's


def test_chunk_rows_hand_computed():
    # CPU: below 32 MiB of float32 logits (32 MiB - 1 byte // 4V), then down to a multiple of 64
    assert chunk_rows(VOCAB, "cpu") == 128  # 170 rows fit
    assert chunk_rows(128256, "cpu") == 64  # 65 fit
    assert chunk_rows(1 << 20, "cpu") == 7  # 7 fit: under 64, kept
    assert chunk_rows(10 ** 8, "cpu") == 1  # not one row fits: one row at a time
    # GPU: 256 MiB
    assert chunk_rows(128256, "cuda") == 512  # 523 fit
    assert chunk_rows(VOCAB, "cuda") == 1344  # 1365 fit


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_one_step_in_many_chunks_matches_transformers(overlap, chunk, make_engine, hf_model):
    engine = make_engine(async_scheduling=overlap)
    engine.core.runner.score_chunk_rows = chunk
    ids = chat(engine, PROMPT)
    out = engine.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=4))[0]
    check(out.prompt_logprobs, ids, reference(hf_model, ids), 4)


def test_chunks_straddle_requests_with_different_top_k(make_engine, hf_model):
    # one step scores two requests (top 1 and top 6) beside a plain one: 5-row chunks cross from one
    # request's rows into the other's, and the step's K is the larger
    engine = make_engine()
    engine.core.runner.score_chunk_rows = 5
    a, b, c = chat(engine, PROMPT), chat(engine, "Count to twenty."), chat(engine, "Name three rivers.")
    plain = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
    alone = engine.generate([b], plain)[0]
    outs = engine.generate([a, b, c], [SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1), plain,
                                       SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=6)])
    assert outs[1].token_ids == alone.token_ids and outs[1].prompt_logprobs is None
    check(outs[0].prompt_logprobs, a, reference(hf_model, a), 1)
    check(outs[2].prompt_logprobs, c, reference(hf_model, c), 6)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_chunked_prefill_mixed_batch_in_small_chunks(overlap, make_engine, hf_model):
    # a 16-token budget: each step scores up to 16 rows in 3-row chunks (the last one short) beside
    # a plain request's decode steps
    engine = make_engine(async_scheduling=overlap, max_num_batched_tokens=16)
    engine.core.runner.score_chunk_rows = 3
    ids, other = chat(engine, PROMPT), chat(engine, "Count to twenty.")
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = engine.generate([other], plain)[0]
    both = engine.generate([other, ids], [plain, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=5)])
    assert both[0].token_ids == alone.token_ids
    check(both[1].prompt_logprobs, ids, reference(hf_model, ids), 5)
    assert engine.stats()["steps"] > 3


class VocabRows(TorchDispatchMode):
    """Records the row count of every tensor an op returns whose last dimension is the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.rows += [t.shape[:-1].numel() for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB]
        return out


def largest_vocab_rows(engine, ids: list[int]) -> tuple[int, int]:
    """(the most rows of any vocabulary-wide tensor made in the scored steps, the rows scored)."""
    runner = engine.core.runner
    execute_scored, seen, scored = runner.execute_scored, [], []

    def recorded(pairs, previous, prompt):
        with VocabRows() as mode:
            out = execute_scored(pairs, previous, prompt)
        seen.extend(mode.rows)
        scored.append(prompt.num_rows)
        return out

    runner.execute_scored = recorded
    engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=20))
    runner.execute_scored = execute_scored
    return max(seen), sum(scored)


def test_vocab_wide_tensors_hold_at_most_a_chunk(make_engine):
    engine = make_engine()
    ids = chat(engine, PROMPT)
    runner = engine.core.runner
    runner.score_chunk_rows = 3
    most, scored = largest_vocab_rows(engine, ids)
    assert scored == len(ids) - 1 >= 40  # all in one step, rows >> chunk
    assert most == 3
    runner.score_chunk_rows = 1000  # the recorder sees the whole step's rows in one chunk
    assert largest_vocab_rows(engine, ids) == (scored, scored)
