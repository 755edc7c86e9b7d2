"""Counts in a parsed HTTP request body that no request of this server can serve, refused before the
body is validated into its request model (http_api/body.py ``validated``). pydantic-core holds the
GIL for the whole of one validation, so the event loop (every tenant's streams) and the engine's
step thread waited for it: 300,000 chat messages (10 MB) held them ~1 s, 2.5M completion prompts
(15 MB) 1-2 s, 2.6M /detokenize ids ~0.3 s, only to be refused afterwards by these same rules.

Each check looks at the parsed JSON only where it has the shape the rule is about (a JSON object
whose field is a list); anything else is left to the validation, which refuses it as before. The
refusal is the one the request got after validation (same message, same ``param``); a body with
two faults may now get this one first.
"""

from __future__ import annotations

from nlora_serve.engine.sample.sampling import (MAX_ALLOWED_TOKEN_IDS, MAX_BAD_WORDS, MAX_LOGIT_BIAS, MAX_LOGPROB_TOKEN_IDS,
                                         MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, RequestError, shown_value)
from nlora_serve.serving.chat_template import check_message_count
from nlora_serve.serving.http_api.choices import check_places
from nlora_serve.serving.http_api.prompts import MAX_PROMPTS
from nlora_serve.serving.http_api.request_models import ParamError


def check_prompt_count(count: int) -> None:
    """Refuse a /v1/completions batch of more than :data:`MAX_PROMPTS` prompts.

    Raises:
        ParamError: param ``prompt``.
    """
    if count > MAX_PROMPTS:
        raise ParamError(f"prompt list length {count} exceeds the maximum allowed count of {MAX_PROMPTS} "
                         "(vLLM's VLLM_MAX_COMPLETION_PROMPTS default)", "prompt")


def check_token_count(count: int, max_model_len: int) -> None:
    """Refuse /detokenize ``tokens`` of more ids than ``max_model_len``: no prompt or output of this
    server holds more.

    Raises:
        ParamError: param ``tokens``.
    """
    if count > max_model_len:
        raise ParamError(f"tokens holds {count:,} ids: more than the model's context holds "
                         f"(max_model_len {max_model_len})", "tokens")


def refuse_chat(data, max_model_len: int, field: str = "messages") -> None:
    """Before validation: a chat body (/v1/chat/completions, /tokenize with messages) whose
    ``field`` lists more messages than ``max_model_len`` (each renders at least one token: see
    :func:`~nlora_serve.serving.chat_template.check_message_count`, the rule rendering applies).

    Raises:
        ParamError: param ``field``.
    """
    messages = data.get(field) if isinstance(data, dict) else None
    if isinstance(messages, list):
        try:
            check_message_count(len(messages), field, max_model_len)
        except RequestError as exc:
            raise ParamError(str(exc), field) from None


def refuse_completion(data, max_queue: int) -> None:
    """Before validation: a /v1/completions body whose ``prompt`` is a batch (a list whose first
    item is a text or a list: never one prompt of token ids) of more than :data:`MAX_PROMPTS`
    prompts, or of more prompts x ``n`` than ``max_queue`` requests (``n`` unset or null: 1; an
    ``n`` that its own checks refuse is left to them).

    Raises:
        ParamError: param ``prompt`` (the messages of :func:`check_prompt_count` and
            :func:`~nlora_serve.serving.http_api.choices.check_places`).
    """
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if not isinstance(prompt, list) or not prompt or type(prompt[0]) not in (str, list):
        return
    check_prompt_count(len(prompt))
    n = 1 if data.get("n") is None else data["n"]
    if type(n) is int and 1 <= n <= max_queue:
        check_places(len(prompt), n, max_queue)


def refuse_detokenize(data, max_model_len: int) -> None:
    """Before validation: /detokenize ``tokens`` listing more ids than ``max_model_len``.

    Raises:
        ParamError: from :func:`check_token_count`.
    """
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if isinstance(tokens, list):
        check_token_count(len(tokens), max_model_len)


# the sampling fields SamplingParams bounds by count: (field, most items, its words)
_COUNTED = (("stop", MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} strings"),
            ("stop_token_ids", MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} token ids"),
            ("logit_bias", MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries"),
            # vLLM 0.32 takes an empty list as unset (its to_sampling_params: ``logprob_token_ids or None``)
            ("logprob_token_ids", MAX_LOGPROB_TOKEN_IDS,
             f"at most {MAX_LOGPROB_TOKEN_IDS} token ids (null or an empty list: none, as vLLM)"),
            ("allowed_token_ids", MAX_ALLOWED_TOKEN_IDS,
             f"None or 1 to {MAX_ALLOWED_TOKEN_IDS} token ids (vLLM refuses an empty list)"),
            ("bad_words", MAX_BAD_WORDS, f"at most {MAX_BAD_WORDS} words"))


def refuse_sampling_counts(data) -> None:
    """Before validation: a /v1/completions or chat body whose ``stop``, ``stop_token_ids``,
    ``logit_bias``, ``logprob_token_ids``, ``allowed_token_ids`` or ``bad_words`` holds more items
    than SamplingParams takes (the words of its refusal; ``logit_bias`` shown as its (key, bias)
    pairs). A 15 MB ``stop`` list held the GIL ~0.2 s in pydantic and as much in the refusal's repr.

    Raises:
        ParamError: naming the field.
    """
    if not isinstance(data, dict):
        return
    for field, most, words in _COUNTED:
        value = data.get(field)
        if isinstance(value, list | dict) and len(value) > most:
            shown = shown_value(value if isinstance(value, dict) else tuple(value))  # a dict: as its items
            raise ParamError(f"{field} must be {words}; got {shown}", field)
