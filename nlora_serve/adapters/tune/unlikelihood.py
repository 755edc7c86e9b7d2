"""Token-level unlikelihood training with a fixed set of negative candidate tokens.

Source: Welleck, Kulikov, Roller, Dinan, Cho, Weston, "Neural Text Generation with Unlikelihood
Training", ICLR 2020, §4 (token-level unlikelihood). The paper adds to the cross-entropy at each
target position t the term −α Σ_{c ∈ C_t} log(1 − p_θ(c | x_<t)) over negative candidates C_t
(there: the previous context's tokens, minus the target x_t). Here C_t is one fixed set U of
vocabulary tokens chosen by a regular expression on their decoded text (e.g. every token with an
upper-case letter, for a tenant that writes in lower case), minus the target x_t as in the paper,
and the term penalises the set's total probability:

    L_t = −log p_t(x_t) + λ · (−log(1 − p_t(U \\ {x_t})))     p_t(S) = Σ_{v ∈ S} softmax(z_t)_v

The set form is what sampling sees (the chance that the next token is any token of U) and bounds
the paper's per-candidate sum from above: 1 − Σ_c p_c ≤ Π_c (1 − p_c). It is computed without
forming 1 − p, which cancels in float32 as p → 1:

    log(1 − p_t(U')) = logsumexp_{v ∉ U'} z_t,v − logsumexp_v z_t,v

finite whenever some token lies outside U' (the target always does; special tokens always do).
"""

from __future__ import annotations

import re

import torch

from nlora_serve.errors import AdapterError


def compile_pattern(pattern: str) -> re.Pattern:
    """``re.compile(pattern)``. Raises: AdapterError naming the pattern when it does not compile."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"--unlikely-tokens {pattern!r} is not a regular expression ({exc})") from None


def unlikely_token_mask(tokenizer, pattern: str, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: True for every token whose decoded text (``tokenizer.decode([id])``, a
    leading space included) matches ``pattern`` (``re.search``). Special tokens (the chat
    template's ``<|im_end|>`` and the like) never match, so the end of an answer stays allowed;
    ids past the tokenizer's vocabulary (padding rows of the LM head) never match either.

    Raises:
        AdapterError: ``pattern`` is not a regular expression, or it matches no token, or every
            token that is not special.
    """
    regex = compile_pattern(pattern)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    text_ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
    for i in text_ids:
        mask[i] = regex.search(tokenizer.decode([i])) is not None
    hits = int(mask.sum())
    if hits == 0:
        raise AdapterError(f"--unlikely-tokens {pattern!r} matches no token of the vocabulary")
    if hits == len(text_ids):
        raise AdapterError(f"--unlikely-tokens {pattern!r} matches every token ({hits}); nothing would be "
                           "left to say")
    return mask


def unlikelihood_sum(logits: torch.Tensor, targets: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """Σ_t −log(1 − p_t(U \\ {x_t})) in nats (see the module docstring), summed over positions.

    Args:
        logits: [K, V] float, the next-token logits of the K positions that carry loss.
        targets: [K] int64, the target token x_t of each position (excluded from its own U).
        unlikely: [V] bool, the negative candidate set U (:func:`unlikely_token_mask`).

    Returns:
        A 0-d tensor of ``logits``' dtype, ≥ 0 up to rounding; differentiable in ``logits``.
    """
    negative = unlikely.expand_as(logits).clone()  # [K, V]
    negative[torch.arange(len(targets)), targets] = False  # the target is never its own negative
    allowed = logits.masked_fill(negative, float("-inf"))
    log_keep = torch.logsumexp(allowed, dim=-1) - torch.logsumexp(logits, dim=-1)  # log(1 − p_t(U')) [K]
    return -log_keep.sum()


def unlikely_mass(logits: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """p_t(U) per position: [K, V] logits, [V] bool → [K] float (the whole set, target included)."""
    return torch.softmax(logits.float(), dim=-1)[:, unlikely].sum(-1)
