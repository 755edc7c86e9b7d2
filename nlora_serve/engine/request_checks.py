"""Request checks shared by both engines (ours and the vLLM-backed one)."""

from __future__ import annotations

from nlora_serve.engine.sampling import RequestError


def check_request(prompt_ids: list[int], max_tokens: int, vocab_size: int, max_model_len: int,
                  stop_token_ids: tuple[int, ...] = (), logit_bias: tuple[tuple[int, float], ...] = (),
                  allowed_token_ids: tuple[int, ...] | None = None,
                  logprob_token_ids: tuple[int, ...] | None = None) -> None:
    """The admission check of a prompt, its max_tokens, its stop_token_ids, logit_bias, allowed ids and
    logprob_token_ids, before any KV block is used (both backends).

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
    if outside:  # vLLM's message
        raise RequestError(f"token_id(s) {outside} in logprob_token_ids contain out-of-vocab token ids. Vocabulary "
                           f"size: {vocab_size}", "logprob_token_ids")
    check_context(len(prompt_ids), max_tokens, max_model_len)


def check_context(num_prompt: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's context rule, in its words (OpenAI server, ``serving_engine._validate_input`` up to
    vLLM 0.10): ``num_prompt + max_tokens`` tokens must fit in ``max_model_len``; with
    ``max_tokens`` None (the rest of the context) the prompt must leave room for one token.

    Raises:
        RequestError: the request does not fit (the message gives both numbers and the limit).
    """
    if max_tokens is None and num_prompt >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{num_prompt} tokens in the messages. Please reduce the length of the messages.")
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
                           "completion). Please reduce the length of the messages or completion.")


def unloaded_reason(version) -> str:
    """Why a request on the AdapterVersion ``version`` was aborted by a forced unload (both backends)."""
    return (f"adapter {version.name!r} v{version.version} was unloaded by an operator (UnloadAdapter force=true) "
            "while this request ran; the request was aborted")
