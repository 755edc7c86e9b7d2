"""allowed_token_ids and bad_words in the engine (engine/sample/token_masks.py), step by step and with
async scheduling (a multi-token bad word reads the output's last tokens, so its step is read back
before the next is launched): a batch of masked greedy requests equals transformers' greedy tokens
under the same masks, computed here by hand; and vLLM's tokenization rule for bad words."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.sample.token_masks import bad_words_token_ids

PROMPTS = ["The capital of France is", "Plants make food through a process called", "Once upon a time"]
NEW = 10


def _reference(hf_model, prompt: list[int], allowed: list[int] | None, banned: list[list[int]]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
            if allowed is not None:
                keep = logits[allowed].clone()
                logits[:] = float("-inf")
                logits[allowed] = keep
            output = ids[len(prompt):]
            for seq in banned:
                if len(seq) - 1 <= len(output) and (len(seq) == 1 or output[len(output) - len(seq) + 1:] == seq[:-1]):
                    logits[seq[-1]] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("overlap", [False, True])
def test_masked_batch_equals_transformers(base_fp32, hf_model, overlap):
    tok = base_fp32.tokenizer()
    core = EngineCore(EngineConfig(async_scheduling=overlap,
                                   scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                                             max_model_len=256),
                                   cache=CacheConfig(block_size=16, num_blocks=64)), base_fp32)
    jobs, expected = [], {}
    for i, text in enumerate(PROMPTS):
        prompt = tok.encode(text)
        free = _reference(hf_model, prompt, None, [])
        words = tok.decode(free).split()[:2]  # the free answer's first words: the mask changes it
        banned = [list(s) for s in bad_words_token_ids(tok, tuple(words))]
        allowed = sorted(set(free[1:]) | set(range(300, 5000, 61))) if i == 1 else None
        params = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0, ignore_eos=True, bad_words=tuple(words),
                                allowed_token_ids=tuple(allowed) if allowed else None)
        jobs.append((f"r{i}", prompt, params))
        expected[f"r{i}"] = _reference(hf_model, prompt, allowed, banned)
        assert expected[f"r{i}"] != free
    for rid, prompt, params in jobs:
        core.add(rid, prompt, params)
    got = {rid: [] for rid, _, _ in jobs}
    while core.has_work():
        for out in core.step():
            got[out.request_id] += out.token_ids
    assert got == expected


def test_bad_words_tokenize_as_vllm_does(base_fp32):
    tok = base_fp32.tokenizer()
    plain, spaced = tok.encode("Paris", add_special_tokens=False), tok.encode(" Paris", add_special_tokens=False)
    assert plain != spaced and len(plain) == len(spaced)  # both kept: start of text and after a space
    assert bad_words_token_ids(tok, (" Paris",)) == (tuple(plain), tuple(spaced))  # the word is stripped first
    with pytest.raises(RequestError, match="at least one token"):
        bad_words_token_ids(tok, (" ",))
    with pytest.raises(RequestError, match="Too many bad words"):
        bad_words_token_ids(tok, tuple(f"word{i}" for i in range(100)))


def test_masks_that_leave_no_first_token_are_refused_at_admission(base_fp32):
    """allowed_token_ids all banned by bad_words, or all EOS / stop ids under min_tokens, left a row
    of -inf: the sampler drew token 0 (<|endoftext|>, never allowed) at every step, 200 OK."""
    tok = base_fp32.tokenizer()
    core = EngineCore(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                                             max_model_len=256),
                                   cache=CacheConfig(block_size=16, num_blocks=16)), base_fp32)
    prompt, start, eos = tok.encode("Hi"), tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    refused = {"bad_words bans every one": dict(allowed_token_ids=(start,), bad_words=("<|im_start|>",)),
               "min_tokens=2 bans until then": dict(allowed_token_ids=(eos,), min_tokens=2),
               "min_tokens=1 bans": dict(allowed_token_ids=(eos, 7), stop_token_ids=(7,), min_tokens=1)}
    for words, fields in refused.items():
        with pytest.raises(RequestError, match=words) as caught:
            core.validate(prompt, SamplingParams(max_tokens=4, **fields))
        assert caught.value.param == "allowed_token_ids"
    for fields in (dict(allowed_token_ids=(start, 5), bad_words=("<|im_start|>",)),  # 5 is left
                   dict(allowed_token_ids=(eos,)), dict(allowed_token_ids=(eos, 5), min_tokens=2),
                   dict(allowed_token_ids=(start,), bad_words=("x<|im_start|>",))):  # banned only after x
        core.validate(prompt, SamplingParams(max_tokens=4, **fields))
