"""SamplingParams.allowed_token_ids and bad_words over gRPC (vLLM's fields, engine/sample/token_masks.py):
greedy tokens equal transformers' greedy tokens under the same masks, computed here by hand, and
each mask changes the unmasked answer; an id outside the vocabulary is INVALID_ARGUMENT naming it."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.client import InvalidArgument, NloraClient

PROMPT = "The capital of France is"
NEW = 10


def _greedy(hf_model, prompt: list[int], mask) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
            mask(logits, ids[len(prompt):])
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _tokens(server, prompt: list[int], **sampling) -> list[int]:
    with NloraClient(server.target, timeout=120) as client:
        _, deltas = client.complete(prompt, max_tokens=NEW, min_tokens=NEW, temperature=0.0, ignore_eos=True,
                                    **sampling)
    return [t for d in deltas for t in d.token_ids]


def test_masks_over_grpc_equal_transformers(make_module_server, tokenizer, hf_model):
    server = make_module_server()
    prompt = tokenizer.encode(PROMPT)
    free = _greedy(hf_model, prompt, lambda logits, output: None)
    allowed = sorted(set(free[2:]) | set(range(200, 4000, 97)))

    def keep(logits, _output):
        outside = torch.ones_like(logits, dtype=torch.bool)
        outside[allowed] = False
        logits[outside] = float("-inf")

    words = tokenizer.decode(free).split()[:2]
    sequences = []
    for word in words:
        plain, spaced = (tokenizer.encode(p + word.lstrip(), add_special_tokens=False) for p in ("", " "))
        sequences += [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])

    def ban(logits, output):
        for seq in sequences:
            if len(seq) - 1 <= len(output) and (len(seq) == 1 or output[len(output) - len(seq) + 1:] == seq[:-1]):
                logits[seq[-1]] = float("-inf")

    for sampling, mask in (({"allowed_token_ids": allowed}, keep), ({"bad_words": words}, ban)):
        expected = _greedy(hf_model, prompt, mask)
        assert _tokens(server, prompt, **sampling) == expected != free, sampling
    with pytest.raises(InvalidArgument, match="allowed_token_ids"):
        _tokens(server, prompt, allowed_token_ids=[10**6])
