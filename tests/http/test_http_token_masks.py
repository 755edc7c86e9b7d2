"""vLLM's ``allowed_token_ids`` and ``bad_words`` over HTTP (engine/sample/token_masks.py): greedy answers
equal transformers' greedy tokens under the same mask, computed here from the rule vLLM 0.32
documents (v1/sample/ops/bad_words.py, SamplingParams.update_from_tokenizer), and each mask
changes the unmasked answer (so the test fails where the field is ignored)."""

from __future__ import annotations

import torch

from grpc_harness import TENANT_KEYS
from http_harness import client, hf_greedy

PROMPT = "The capital of France is"
NUM_TOKENS = 10


def _masked_greedy(hf_model, prompt: list[int], n: int, mask) -> list[int]:
    """n greedy tokens of transformers after ``prompt``, ``mask(logits, output)`` applied to each
    step's float64 logits first."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
            mask(logits, ids[len(prompt):])
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _complete(server, prompt: list[int], **extra) -> tuple[list[int], str]:
    api = client(server, TENANT_KEYS["base-co"])
    reply = api.completions.create(model=server.server.generation.info.model, prompt=prompt, max_tokens=NUM_TOKENS,
                                   temperature=0, logprobs=0,
                                   extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra})
    tokens = [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]
    return tokens, reply.choices[0].text


def test_allowed_token_ids_greedy_equals_the_masked_reference(http_server, tokenizer, hf_model):
    prompt = tokenizer.encode(PROMPT)
    free = hf_greedy(hf_model, prompt, NUM_TOKENS)
    # the free answer's tokens but its first two, and a spread of others: the answer must change
    allowed = sorted(set(free[2:]) | set(range(200, 4000, 97)))
    assert not set(free[:2]) & set(allowed)

    def keep(logits, _output):
        outside = torch.ones_like(logits, dtype=torch.bool)
        outside[allowed] = False
        logits[outside] = float("-inf")

    expected = _masked_greedy(hf_model, prompt, NUM_TOKENS, keep)
    tokens, _ = _complete(http_server, prompt, allowed_token_ids=allowed)
    assert tokens == expected and set(tokens) <= set(allowed) and tokens != free


def _bad_sequences(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: the word, and with a leading space where that is another
    first token of as many tokens."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def test_bad_words_greedy_equals_the_masked_reference(http_server, tokenizer, hf_model):
    prompt = tokenizer.encode(PROMPT)
    free_tokens = hf_greedy(hf_model, prompt, NUM_TOKENS)
    free = tokenizer.decode(free_tokens)
    words = free.split()[:2]  # the free answer's first two words (one of them several tokens long)
    sequences = _bad_sequences(tokenizer, words)
    assert any(len(s) > 1 for s in sequences), sequences

    def ban(logits, output):
        for seq in sequences:
            if len(seq) - 1 <= len(output) and (len(seq) == 1 or output[len(output) - len(seq) + 1:] == seq[:-1]):
                logits[seq[-1]] = float("-inf")

    expected = _masked_greedy(hf_model, prompt, NUM_TOKENS, ban)
    tokens, text = _complete(http_server, prompt, bad_words=words)
    assert tokens == expected and tokens != free_tokens, (free, text)


def test_mask_refusals_name_the_field(http_server):
    api = client(http_server, TENANT_KEYS["base-co"])
    model = http_server.server.generation.info.model
    for extra, param in (({"allowed_token_ids": []}, "allowed_token_ids"),
                         ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
                         ({"bad_words": [""]}, "bad_words"),
                         ({"use_beam_search": True}, "use_beam_search")):
        try:
            api.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body=extra)
        except Exception as exc:  # openai.BadRequestError
            assert getattr(exc, "status_code", None) == 400 and exc.body["param"] == param, (extra, exc)
        else:
            raise AssertionError(f"{extra} was accepted")


def test_spaces_between_special_tokens_false_writes_adjacent_added_tokens_bare(http_server, tokenizer):
    """vLLM's ``spaces_between_special_tokens: false`` with ``skip_special_tokens: false`` (was refused):
    every token here is an added token (allowed_token_ids keeps four of SmolLM2's), so each after the
    first is its bare text (vLLM 0.32's FastIncrementalDetokenizer): the text is their contents joined."""
    specials = [1, 2, 3, 4]
    assert all(t in tokenizer.added_tokens_decoder for t in specials)
    tokens, text = _complete(http_server, tokenizer.encode(PROMPT), allowed_token_ids=specials,
                             skip_special_tokens=False, spaces_between_special_tokens=False)
    assert len(tokens) == NUM_TOKENS and set(tokens) <= set(specials)
    assert text == "".join(tokenizer.added_tokens_decoder[t].content for t in tokens)


def test_a_final_partial_character_is_not_written_and_completes_no_stop_string(http_server, tokenizer):
    """The last token leaves a partial UTF-8 character (byte 0xC3 alone): vLLM 0.32 writes nothing
    for it, so a stop string U+FFFD finds nothing ("", "length", null both ways; its recorded answers,
    tests/data/vllm_live.json). Ours wrote U+FFFD, and with the stop string stopped on it."""
    partial = tokenizer.convert_tokens_to_ids("Ã")  # byte-level BPE: the byte 0xC3 alone
    assert tokenizer.decode([partial]) == "\ufffd"
    api = client(http_server, TENANT_KEYS["base-co"])
    model = http_server.server.generation.info.model
    for extra in ({"stop": ["\ufffd"]}, {}):
        choice = api.completions.create(model=model, prompt="Hi", max_tokens=1,
                                        extra_body={"allowed_token_ids": [partial], **extra}).choices[0]
        assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == ("", "length", None)
