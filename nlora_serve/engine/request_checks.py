"""Request checks shared by both engines (ours and the vLLM-backed one)."""

from __future__ import annotations

import dataclasses

from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.errors import shown


def check_request(prompt_ids: list[int], vocab_size: int, max_model_len: int,
                  stop_token_ids: tuple[int, ...] = (), logit_bias: tuple[tuple[int, float], ...] = (),
                  allowed_token_ids: tuple[int, ...] | None = None,
                  logprob_token_ids: tuple[int, ...] | None = None) -> None:
    """The admission check of a prompt, its stop_token_ids, logit_bias, allowed ids and
    logprob_token_ids, before any KV block is used (both backends); max_tokens is not checked here
    but lowered to the context left (:func:`fit_to_context`).

    Raises:
        RequestError: empty prompt, a prompt or stop token id outside ``[0, vocab_size)`` (a stop id
            there would index past the logits when min_tokens bans it, failing the whole batch's
            step; a logit_bias or logprob_token_ids id there likewise), or see :func:`check_context`.
    """
    if not prompt_ids:
        raise RequestError("prompt is empty: need at least one token", "prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise RequestError(f"prompt token ids must be in [0, {vocab_size}); got {min(prompt_ids)}..{max(prompt_ids)}",
                           "prompt")
    outside = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if outside:
        raise RequestError(f"stop_token_ids must be in [0, {vocab_size}); got {outside[0]}", "stop_token_ids")
    outside = [t for t, _ in logit_bias if not 0 <= t < vocab_size]
    if outside:
        raise RequestError(f"logit_bias token ids must be in [0, {vocab_size}); got {outside[0]}", "logit_bias")
    outside = [t for t in allowed_token_ids or () if not 0 <= t < vocab_size]
    if outside:  # vLLM's message
        raise RequestError(f"allowed_token_ids contains out-of-vocab token id: {outside[0]} (vocabulary size "
                           f"{vocab_size})", "allowed_token_ids")
    outside = [t for t in logprob_token_ids or () if not 0 <= t < vocab_size]
    if outside:  # vLLM's message; 128 ids of 19 digits would crowd out its end past the 1,000 characters kept
        raise RequestError(f"token_id(s) {shown(str(outside))} in logprob_token_ids contain out-of-vocab token ids. "
                           f"Vocabulary size: {vocab_size}", "logprob_token_ids")
    check_context(len(prompt_ids), max_model_len)


def check_context(num_prompt: int, max_model_len: int) -> None:
    """vLLM 0.32's context rule for the prompt alone (``InputProcessor._validate_model_input``):
    the prompt must leave room for one generated token, ``num_prompt < max_model_len``. A
    ``max_tokens`` over the room left is lowered, not refused (:func:`fit_to_context`).

    Raises:
        RequestError: the prompt leaves no room (the message gives its length and the limit).
    """
    if num_prompt >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{num_prompt} tokens in the messages. Please reduce the length of the messages.")


def fit_to_context(num_prompt: int, params: SamplingParams, max_model_len: int) -> SamplingParams:
    """``params`` with max_tokens lowered to the context left, ``min(max_tokens, max_model_len -
    num_prompt)``, as vLLM 0.32's ``get_max_tokens`` lowers it silently (the request then ends with
    finish_reason "length" at the context's end, as one with max_tokens unset); ``params`` itself
    when it fits. ``num_prompt``: prompt tokens, as they run (after any truncation).

    Raises:
        RequestError: a prompt that leaves no room (:func:`check_context`), or ``min_tokens`` over the
            room left (vLLM refuses it too: its SamplingParams' min_tokens <= the lowered max_tokens).
    """
    check_context(num_prompt, max_model_len)
    room = max_model_len - num_prompt
    if params.min_tokens > room:  # else SamplingParams would name a max_tokens never sent
        raise RequestError(f"min_tokens {params.min_tokens} is more than the {room} tokens of context left "
                           f"(max_model_len {max_model_len}, prompt {num_prompt} tokens)", param="min_tokens")
    return params if params.max_tokens <= room else dataclasses.replace(params, max_tokens=room)


def unloaded_reason(version) -> str:
    """Why a request on the AdapterVersion ``version`` was aborted by a forced unload (both backends)."""
    return (f"adapter {version.name!r} v{version.version} was unloaded by an operator (UnloadAdapter force=true) "
            "while this request ran; the request was aborted")
