"""Prompt log-probabilities (SamplingParams.prompt_logprobs) against transformers' float64
log_softmax over the prompt: whole prefills, prompts split across steps, prefix-cache hits, mixed
batches, preemption."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.engine.sample.sampling import RequestError, SamplingParams

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
TOL = 1e-3  # as test_engine.py's logprobs test: fp32 engine against the fp32 model (measured max 1.2e-4)


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)


def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] float64: row p is log p(. | ids[:p + 1]), transformers' forward."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)


def check(got: list, ids: list[int], want: torch.Tensor, k: int) -> None:
    """``got`` (RequestOutput.prompt_logprobs) against the reference rows ``want``."""
    assert len(got) == len(ids) and got[0] is None
    for p, scored in enumerate(got[1:]):
        entry = scored.logprobs
        token = ids[p + 1]
        assert list(entry)[0] == token  # the scored prompt token first
        value = float(want[p, token])
        assert entry[token] == pytest.approx(value, abs=TOL), p
        # its vocabulary rank, up to the tokens within the tolerance of it
        assert 1 + int((want[p] > value + TOL).sum()) <= scored.rank <= 1 + int((want[p] > value - TOL).sum()), p
        top = want[p].topk(k)
        assert set(top.indices.tolist()) <= set(entry) and len(entry) <= k + 1, p
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t] == pytest.approx(v, abs=TOL)


@OVERLAP
def test_prompt_logprobs_match_transformers(overlap, make_engine, hf_model):
    engine = make_engine(async_scheduling=overlap)
    ids = chat(engine, PROMPT)
    out = engine.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))[0]
    check(out.prompt_logprobs, ids, reference(hf_model, ids), 3)


@OVERLAP
def test_chunked_prefill_mixed_batch_leaves_the_other_request_unchanged(overlap, make_engine, hf_model):
    # a 16-token budget: the prompt (> 40 tokens) is scored across several steps, beside a plain
    # request whose greedy tokens and sampled logprobs must be those it gets alone
    engine = make_engine(async_scheduling=overlap, max_num_batched_tokens=16)
    ids, other = chat(engine, PROMPT), chat(engine, "Count to twenty.")
    assert len(ids) > 40
    plain = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    alone = engine.generate([other], plain)[0]
    both = engine.generate([other, ids], [plain, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=5)])
    assert both[0].token_ids == alone.token_ids and both[0].prompt_logprobs is None
    for a, b in zip(both[0].logprobs, alone.logprobs):
        assert a.keys() == b.keys() and all(a[t] == pytest.approx(b[t], abs=1e-5) for t in a)
    check(both[1].prompt_logprobs, ids, reference(hf_model, ids), 5)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["steps"] > 3


def test_prefix_cache_hit_still_scores_the_whole_prompt(make_engine, hf_model):
    engine = make_engine(block_size=8)
    ids = chat(engine, PROMPT)
    want = reference(hf_model, ids)
    engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    hits = engine.stats()["prefix_cache_hits"]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    first, second = engine.generate([ids], params)[0], engine.generate([ids], params)[0]
    check(first.prompt_logprobs, ids, want, 2)
    check(second.prompt_logprobs, ids, want, 2)
    assert first.cached_tokens == second.cached_tokens == 0
    assert engine.stats()["prefix_cache_hits"] == hits  # neither read the cache
    plain = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert plain.cached_tokens >= 8 and plain.prompt_logprobs is None  # the cache still serves others


def test_preempted_request_scores_each_prompt_token_once(make_engine, hf_model):
    # 12 blocks of 8 tokens: two long requests cannot both hold their blocks, the newer one is
    # preempted mid-generation and recomputes its prompt
    engine = make_engine(block_size=8, num_blocks=12, max_num_batched_tokens=64, max_model_len=96)
    a, b = chat(engine, PROMPT), chat(engine, "Tell me about the history of lighthouses in France.")
    long_run = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    outs = engine.generate([a, b], long_run)
    assert engine.stats()["preemptions"] > 0
    for ids, out in zip((a, b), outs):
        check(out.prompt_logprobs, ids, reference(hf_model, ids), 1)


def test_one_token_prompt_and_the_range(make_engine):
    engine = make_engine()
    out = engine.generate([[1]], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    assert out.prompt_logprobs == [None]
    for bad in (-1, 21, True):
        with pytest.raises(RequestError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_tied_tokens_rank_as_vllm_ranks_them():
    """vLLM 0.32 ranks a prompt token by the tokens at least as likely, itself included
    (v1/sample/ops/logprobs.py batched_count_greater_than: ``(x >= values).sum(-1)``): tied tokens
    all take the lowest rank. bf16 logits (--dtype auto on fast-bf16 CPUs) tie often; this was
    1 + the tokens strictly more likely (row 0: 1, row 1: 2)."""
    from nlora_serve.engine.sample.prompt_logprobs import PromptRows, score

    logits = torch.tensor([[2.0, 2.0, 2.0, 1.0], [3.0, 1.0, 1.0, 1.0], [0.0, 5.0, 1.0, 2.0]])
    rows = PromptRows(torch.arange(3), torch.tensor([1, 2, 1]), [], top_k=0)
    scored, ranks = score(lambda idx: logits[idx].clone(), torch.arange(3), rows, chunk=2)
    assert ranks.tolist() == [3, 4, 1]  # by hand: {0, 1, 2} >= 2; {0, 1, 2, 3} >= 1; only itself >= 5
    want = torch.log_softmax(logits.double(), -1)[[0, 1, 2], [1, 2, 1]]
    assert scored.tolist() == pytest.approx(want.tolist(), abs=1e-6)  # computed in float32
