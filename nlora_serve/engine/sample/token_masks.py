"""vLLM's token masks of a request: ``allowed_token_ids`` and ``bad_words``.

Both apply after the log-probabilities are taken and before ``logit_bias`` and the penalties, as in
vLLM 0.32's sampler (v1/sample/sampler.py ``apply_logits_processors``): the row's logits outside
``allowed_token_ids`` are set to -inf, then each bad word's last token is set to -inf where the
output so far ends with the word's other tokens (v1/sample/ops/bad_words.py). A bad word is
tokenized as vLLM's ``SamplingParams.update_from_tokenizer`` does: without and with a leading space
(the second kept only where it starts with another token and has as many tokens), so a word is
banned at the start of the text and after a space.
"""

from __future__ import annotations

import torch

from nlora_serve.engine.sample.sampling import MAX_BAD_WORDS, RequestError
from nlora_serve.engine.runner.device_values import to_device


def bad_words_token_ids(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The token sequences that ``words`` ban (vLLM's rule, above).

    Raises:
        RequestError: a word that tokenizes to nothing, or more than :data:`MAX_BAD_WORDS`
            sequences in all (vLLM's messages; ``param`` bad_words).
    """
    sequences: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        for prefix in ("", " "):
            ids = tuple(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                if not prefix:
                    raise RequestError("bad_words entries must tokenize to at least one token.", "bad_words")
                continue
            if not prefix or (ids[0] != sequences[-1][0] and len(ids) == len(sequences[-1])):
                sequences.append(ids)
                if len(sequences) > MAX_BAD_WORDS:
                    raise RequestError(f"Too many bad words after tokenization: {len(sequences)}. The max number "
                                       f"is {MAX_BAD_WORDS}.", "bad_words")
    return tuple(sequences)


def check_a_first_token(allowed: tuple[int, ...] | None, bad_words_ids: tuple[tuple[int, ...], ...],
                        min_tokens: int, banned_before_min_tokens: frozenset[int]) -> None:
    """Refuse masks that leave no token to sample first: every ``allowed`` id a one-token bad word
    (banned at every step), or, with ``min_tokens`` > 0, an EOS or stop id (``banned_before_min_tokens``).
    The sampler then drew from a row of -inf: token 0, outside ``allowed``, at every step.

    Raises:
        RequestError: such masks, naming both fields (``param`` allowed_token_ids).
    """
    if allowed is None or not (bad_words_ids or min_tokens):
        return
    one_token = {ids[0] for ids in bad_words_ids if len(ids) == 1}
    # all() stops at the first id left: a request that samples costs a look or two (this runs on the step thread too)
    if all(t in one_token for t in allowed):
        raise RequestError("allowed_token_ids: bad_words bans every one of them, so no token could be sampled",
                           "allowed_token_ids")
    if min_tokens and all(t in one_token or t in banned_before_min_tokens for t in allowed):
        raise RequestError(f"allowed_token_ids: every one left is an end-of-sequence or stop token, which "
                           f"min_tokens={min_tokens} bans until then, so no token could be sampled first",
                           "allowed_token_ids")


def keep_allowed(logits: torch.Tensor, rows: list[int], allowed: list[torch.Tensor]) -> None:
    """Set ``logits[rows[j], t] = -inf`` for every token ``t`` not in ``allowed[j]``, in place.

    ``logits`` [B, V] float32; ``allowed[j]`` [A_j] int64 on its device, ids checked in ``[0, V)``
    at admission (:attr:`Sequence.allowed_ids`).
    """
    mask = torch.ones((len(rows), logits.shape[1]), dtype=torch.bool, device=logits.device)
    for j, ids in enumerate(allowed):
        mask[j, ids] = False
    index = to_device(rows, logits.device, torch.long)
    logits[index] = logits[index].masked_fill(mask, float("-inf"))


def ban_bad_words(logits: torch.Tensor, words: tuple[tuple[int, ...], ...], output: list[int]) -> None:
    """Set ``logits[w[-1]] = -inf`` for each word ``w`` whose other tokens end ``output``, in place.

    ``logits`` [V] float32, one row; ``output`` the request's generated tokens so far (its prompt
    never counts, as in vLLM).
    """
    for word in words:
        prefix = len(word) - 1
        if prefix <= len(output) and (prefix == 0 or tuple(output[-prefix:]) == word[:-1]):
            logits[word[-1]] = float("-inf")
