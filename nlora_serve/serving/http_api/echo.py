"""``echo`` and ``prompt_logprobs`` in OpenAI / vLLM response shapes, for the HTTP front end (no I/O).

vLLM's rules, which lm-evaluation-harness's ``local-completions`` model relies on to score a
continuation (it sends context + continuation as the prompt with ``echo: true``, ``logprobs``,
``max_tokens`` 1 or 0, ``temperature`` 0, and sums ``choices[0].logprobs.token_logprobs`` over the
continuation's positions):

- ``echo=true`` on /v1/completions puts the prompt's text before the choice's text (streamed: in
  the first chunk, with the first token's text); with ``logprobs=N`` the prompt's tokens come first
  in ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), the first
  one's log-probability and top entries null (nothing scores it), the offsets running on into the
  completion's. The prompt is scored to ``prompt_logprobs=K`` when the request sends it, else to
  K = N (vLLM's ``CompletionRequest.to_sampling_params``), and each other prompt token's
  ``top_logprobs`` are the first N + 1 of its entry (the token itself, then its top K, the token
  once): N + 1 entries even where the token is among the most likely, K + 1 at most when K < N
  (vLLM's ``_create_completion_logprobs``, :func:`echoed_top`). ``max_tokens=0`` with echo returns
  the prompt alone (one token is computed and counted in ``usage.completion_tokens``, as vLLM
  does, but not returned).
- ``prompt_logprobs=K`` (``extra_body``; also what echo with logprobs computes, K = N) returns
  vLLM's ``prompt_logprobs``: per prompt token null for the first, then ``{"<token id>":
  {"logprob", "rank", "decoded_token"}}`` for the prompt token and its top K; on the completion's
  choice (echo with logprobs too, as vLLM), on the chat response's top level. Not with
  ``stream=true`` (vLLM refuses K > 0 there).
- ``-inf`` log-probabilities are sent as -9999.0 (vLLM's clamp: JSON has no infinity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob

FLOOR = -9999.0  # vLLM's stand-in for -inf


@dataclass(slots=True)
class Echo:
    """What an ``echo=true`` completion puts before its choice."""

    text: str  # the prompt's text: as sent, or its token ids decoded
    prompt_only: bool  # max_tokens=0: the prompt alone, the generated token left out


def clamp(logprob: float) -> float:
    return max(logprob, FLOOR)


def with_token(lps: dict[int, float], token_id: int, top: int) -> list[tuple[int, float]]:
    """One position's completions ``top_logprobs`` entries, as vLLM 0.32 builds them from its
    ``{token id: Logprob}`` (the position's own token first, then its top k): the position's token
    ``token_id`` (sampled, or the echoed prompt's) first, then the ``top`` most likely others, best
    first; ``top + 1`` entries when the token is not among the ``top`` most likely, else ``top``.
    OpenAI's rule for ``logprobs``: "the API will always return the logprob of the sampled token,
    so there may be up to logprobs+1 elements in the response".

    ``lps``: the engine's entry, the token's log-probability and at least the ``top`` most likely.
    A tie at the boundary goes to the other token (the engine's top-k chose it), so the token then
    comes as the extra entry, as in vLLM.
    """
    best = sorted(lps.items(), key=lambda kv: (-kv[1], kv[0] == token_id))[:top]
    return [(token_id, lps[token_id])] + [(u, lp) for u, lp in best if u != token_id]


def echoed_top(entry: PromptLogprob, top: int) -> list[tuple[int, float]]:
    """An echoed prompt token's completions ``top_logprobs`` entries: the first ``top`` + 1 of its
    engine entry, which holds the token first, then the K most likely (K the prompt_logprobs it was
    scored to), the token once. vLLM 0.32's ``_create_completion_logprobs`` keeps the items ``i <=
    logprobs`` of the prompt position's ``{token id: Logprob}``, built in that order, so the count
    depends on K, not on where the token ranks: N + 1 where K > N, even for a token among the
    N most likely (a sampled token's entry, scored to N, has N then)."""
    return list(entry.logprobs.items())[:top + 1]


def _contexts(token_ids: list[int], entries: list[PromptLogprob | None]) -> list[list[int] | None]:
    """Per prompt position the tokens its strings are decoded after (TokenText.in_context), as
    vLLM 0.32's prompt logprobs: the last 4 scored prompt tokens before it; None for an unscored one
    (the first: its own decoding, as vLLM's echo writes it)."""
    contexts, scored = [], []
    for t, entry in zip(token_ids, entries):
        contexts.append(None if entry is None else scored[-4:])
        if entry is not None:
            scored.append(t)
    return contexts + [None] * (len(token_ids) - len(contexts))


def echo_logprobs(token_ids: list[int], entries: list[PromptLogprob | None], top: int,
                  token: Callable[[int, list[int] | None], str], offset: int) -> dict:
    """The completion ``logprobs`` object of the prompt's tokens ``token_ids`` (``entries`` from the
    engine, one per token), each token's ``top_logprobs`` the first ``top`` + 1 of its entry
    (:func:`echoed_top`), offsets from ``offset`` (the sum of the tokens' string lengths, as vLLM's
    ``text_offset``). ``token(id, context)``: a token's string at a position after the prompt tokens
    ``context`` (None: its own decoding; :func:`_contexts`)."""
    contexts = _contexts(token_ids, entries)
    tokens = [token(t, context) for t, context in zip(token_ids, contexts)]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    token_logprobs, tops = [], []
    for t, entry, context in zip(token_ids, entries, contexts):
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(clamp(entry.logprobs[t]))
        tops.append({token(u, context): clamp(lp) for u, lp in echoed_top(entry, top)})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(token_ids: list[int], entries: list[PromptLogprob | None], top: int,
                         token: Callable[[int, list[int] | None], str]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None, or ``{str(id): {"logprob", "rank",
    "decoded_token"}}`` with the prompt token first (its vocabulary rank) and the ``top`` most
    likely (ranks 1..top)."""
    out: list[dict | None] = []
    for t, entry, context in zip(token_ids, entries, _contexts(token_ids, entries)):
        if entry is None:
            out.append(None)
            continue
        shaped = {str(t): {"logprob": clamp(entry.logprobs[t]), "rank": entry.rank,
                           "decoded_token": token(t, context)}}
        best = sorted(entry.logprobs.items(), key=lambda kv: -kv[1])[:top]
        for rank, (u, lp) in enumerate(best, start=1):
            shaped.setdefault(str(u), {"logprob": clamp(lp), "rank": rank, "decoded_token": token(u, context)})
        out.append(shaped)
    return out
