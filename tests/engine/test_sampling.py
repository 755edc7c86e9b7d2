"""Sampling against hand-computed distributions; seeded draws reproducible; clear validation errors."""

from __future__ import annotations

import math

import pytest
import torch

from nlora_serve.engine.sample.sampling import (RequestError, SamplingParams, apply_penalties, sample,
                                          top_k_top_p_mask)

PROBS = [0.5, 0.25, 0.15, 0.1]


def frequencies(params: SamplingParams, draws: int = 20000) -> list[float]:
    logits = torch.tensor([PROBS]).log().expand(draws, -1).contiguous()
    tokens = sample(logits, [params] * draws, [None] * draws, torch.Generator().manual_seed(1))
    return (torch.bincount(tokens, minlength=4).float() / draws).tolist()


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(top_p=0.7), [2 / 3, 1 / 3, 0.0, 0.0]),  # 0.5 + 0.25 reaches 0.7
    (SamplingParams(top_k=3), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]),
    (SamplingParams(top_k=3, top_p=0.8), [0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0]),  # p over the top-3 mass
    (SamplingParams(temperature=0.5), [p * p / sum(q * q for q in PROBS) for p in PROBS]),
    (SamplingParams(), PROBS),
])
def test_sampled_frequencies_match_hand_computed(params, expected):
    got = frequencies(params)
    assert got == pytest.approx(expected, abs=0.015)


def test_top_k_top_p_mask_keeps_the_expected_tokens():
    logits = torch.tensor([[0.1, 2.0, 1.0, -1.0]])
    out = top_k_top_p_mask(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isinf(out).tolist() == [[True, False, False, True]]
    out = top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([0.01]))
    assert torch.isinf(out).tolist() == [[True, False, True, True]]  # the best token always stays


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert sample(logits, params, [None, None], torch.Generator()).tolist() == [1, 0]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(seed=7)

    def draw(rows: int) -> int:
        gens = [torch.Generator().manual_seed(7)] + [None] * (rows - 1)
        return int(sample(logits[:rows], [seeded] + [SamplingParams()] * (rows - 1), gens,
                          torch.Generator().manual_seed(rows))[0])

    assert draw(1) == draw(2) == draw(4)
    gens = [torch.Generator().manual_seed(7)]
    first = [int(sample(logits[:1], [seeded], gens, torch.Generator())[0]) for _ in range(8)]
    gens = [torch.Generator().manual_seed(7)]
    again = [int(sample(logits[:1], [seeded], gens, torch.Generator())[0]) for _ in range(8)]
    assert first == again and len(set(first)) > 1


def test_penalties_hand_computed():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [0, 1, 2, 2], num_prompt=2, params=params, ban=set())
    # token 0: 2/2; token 1: -2*2; token 2 (output twice): 1/2 - 0.25*2 - 0.5; token 3 untouched
    assert logits.tolist() == pytest.approx([1.0, -4.0, -0.5, 0.5])


def test_min_tokens_bans_eos_until_reached():
    logits = torch.zeros(4)
    apply_penalties(logits, [1, 3], num_prompt=1, params=SamplingParams(min_tokens=2), ban={2})
    assert logits[2] == -math.inf and logits[3] == 0.0


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                          ("max_tokens", 0), ("logprobs", 21), ("repetition_penalty", 0.0),
                                          ("presence_penalty", 3.0), ("stop", ("",)), ("seed", "x"),
                                          # past int64: the step's tensors would overflow (hostile review)
                                          ("top_k", 1 << 63), ("stop_token_ids", (1 << 63,))])
def test_invalid_params_name_field_and_value(field, value):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{field} .*{value!r}"):
        SamplingParams(**{field: value})


def test_top_k_minus_one_is_off_as_in_vllm():
    """vLLM takes top_k -1 and 0 as off (LangChain's VLLMOpenAI sends -1); below -1 is refused."""
    assert SamplingParams(top_k=-1).top_k == SamplingParams(top_k=0).top_k == 0
    with pytest.raises(RequestError, match=r"SamplingParams\.top_k must be an integer in \[0, 2\^63\), or -1 "
                                           r"\(off, as 0\); got -2"):
        SamplingParams(top_k=-2)


def test_step_bans_stop_ids_only_on_rows_below_min_tokens():
    """sample_step's one batched ban against the per-row rule: EOS (token 3, every row's argmax)
    is banned exactly where fewer than min_tokens outputs exist; the ban set is per row."""
    from nlora_serve.engine.scheduling.sequence import Sequence
    from nlora_serve.engine.sample.step_output import sample_step

    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0]]).repeat(4, 1)
    greedy = {"temperature": 0.0}
    rows = [(SamplingParams(min_tokens=3, **greedy), [9, 1], {3}),  # 1 output < 3: ban EOS -> token 2
            (SamplingParams(min_tokens=3, **greedy), [9, 1, 1, 1], {3}),  # 3 outputs: no ban -> EOS
            (SamplingParams(min_tokens=3, **greedy), [9, 1], {3, 2}),  # EOS and a stop id banned -> token 1
            (SamplingParams(**greedy), [9, 1], {3})]  # no min_tokens -> EOS
    seqs = [Sequence(f"r{i}", i, ids, 1, p) for i, (p, ids, _) in enumerate(rows)]
    step = sample_step(logits.clone(), [(s, 1) for s in seqs], seqs, [b for *_, b in rows], torch.Generator())
    assert step.read()[0] == [2, 3, 1, 3]
    assert step.needs_values is False


def test_step_reads_top_k_and_logprob_token_ids_rows_and_the_prompt_part_after_them():
    """One step with a top-k row, a logprob_token_ids row (vLLM's: the sampled token, then the ids in
    their order, a repeated id once) and a row asking none but prompt logprobs (one scored position): each
    row's entry against log_softmax by hand, the prompt part read past the ids' values."""
    from nlora_serve.engine.sample.prompt_logprobs import PromptRows
    from nlora_serve.engine.scheduling.sequence import Sequence
    from nlora_serve.engine.sample.step_output import sample_step

    raw = [[0.0, 1.0, 3.0, 2.0], [4.0, 0.5, 1.0, -1.0], [0.0, 0.0, 0.0, 1.0]]
    lp = [[x - math.log(sum(math.exp(y) for y in row)) for x in row] for row in raw]
    greedy = {"temperature": 0.0}
    seqs = [Sequence("k", 0, [1], 1, SamplingParams(logprobs=2, **greedy)),
            Sequence("ids", 1, [1], 1, SamplingParams(logprob_token_ids=(3, 0, 3, 1), **greedy)),
            Sequence("none", 2, [1], 1, SamplingParams(prompt_logprobs=0, **greedy))]
    prompt = PromptRows(torch.tensor([0]), torch.tensor([2]), [(seqs[2], 1)], 0)
    step = sample_step(torch.tensor(raw), [(s, 1) for s in seqs], seqs, [set()] * 3, torch.Generator(), prompt,
                       [torch.tensor([-0.25, 3.0], dtype=torch.float64)])
    tokens, _, logprobs = step.read()
    assert tokens == [2, 0, 3]
    (k_row,), (ids_row,) = logprobs[0], logprobs[1]
    assert list(k_row) == [2, 3] and list(ids_row) == [0, 3, 1] and logprobs[2] is None
    for got, row in ((k_row, lp[0]), (ids_row, lp[1])):
        assert all(value == pytest.approx(row[t], abs=1e-6) for t, value in got.items())
    ((seq, (entry,)),) = step.read_prompt()
    assert seq is seqs[2] and entry.logprobs == {2: -0.25} and entry.rank == 3


def test_step_reads_token_values_only_for_value_penalties():
    from nlora_serve.engine.scheduling.sequence import Sequence
    from nlora_serve.engine.sample.step_output import sample_step

    logits = torch.tensor([[0.0, 2.0, 1.5]]).repeat(2, 1)
    seqs = [Sequence("a", 0, [0, 1], 1, SamplingParams(min_tokens=5, temperature=0.0)),
            Sequence("b", 1, [0, 1], 1, SamplingParams(repetition_penalty=2.0, temperature=0.0))]  # token 1 seen: 2/2 < 1.5
    step = sample_step(logits.clone(), [(s, 1) for s in seqs], seqs, [set(), set()], torch.Generator())
    assert step.read()[0] == [1, 2] and step.needs_values is True
