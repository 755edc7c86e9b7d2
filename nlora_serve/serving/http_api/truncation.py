"""vLLM's ``truncate_prompt_tokens`` and ``truncation_side`` (0.32's TokenizeParams): a prompt cut
to k tokens after it is tokenized (a chat after its template renders it), before it is queued."""

from __future__ import annotations

from nlora_serve.errors import shown
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest, ParamError
from nlora_serve.serving.request_policy import shown_int


def truncation_of(request: CompletionRequest | ChatRequest, max_model_len: int) -> tuple[int, str] | None:
    """(tokens to keep, side) of a request's ``truncate_prompt_tokens``, None when unset, as vLLM
    0.32's TokenizeParams: -1 keeps ``max_model_len - 1`` (one token of room to generate), side
    "left" (the default for generation: vLLM's tokenizer truncation_side) keeps the last tokens,
    "right" the first.

    Raises:
        ParamError: below -1, 0 (an empty prompt, which vLLM then refuses), over ``max_model_len``
            (vLLM's words), a side other than left or right.
    """
    keep, side = request.truncate_prompt_tokens, request.truncation_side or "left"
    if side not in ("left", "right"):
        raise ParamError(f"truncation_side must be either 'left' or 'right'; got {shown(side)!r}", "truncation_side")
    if keep is None:
        return None
    if keep < -1 or keep == 0:
        raise ParamError(f"truncate_prompt_tokens must be -1 (max_model_len - 1) or at least 1 (0 would leave an "
                         f"empty prompt); got {shown_int(keep)}", "truncate_prompt_tokens")
    if keep > max_model_len:
        raise ParamError(f"truncate_prompt_tokens={shown_int(keep)} cannot be greater than max_model_len = "
                         f"{max_model_len}. Please request a smaller truncation size.", "truncate_prompt_tokens")
    return (max_model_len - 1 if keep == -1 else keep), side


def check_truncatable(prompts: list[str | list[int]], max_bytes: int) -> None:
    """Refuse, before any prompt waits for the tokenizer, a text prompt that truncate_prompt_tokens
    asks to cut but that is over ``max_bytes`` bytes of UTF-8 (engine/api.py's ``max_prompt_bytes``:
    the engine refuses such a text untokenized, a guard of the one tokenizer thread, so it could
    never be cut; vLLM tokenizes any text whole, then cuts it).

    Raises:
        ParamError: naming ``prompt`` (``prompt[i]`` in the message, for a batch's).
    """
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or 4 * len(prompt) <= max_bytes:  # UTF-8: at most 4 bytes a character
            continue
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ParamError(f"{where} is {size:,} bytes of UTF-8, over the {max_bytes:,} this server tokenizes at "
                             "most (more would surely exceed max_model_len tokens): truncate_prompt_tokens cuts a "
                             "prompt once it is tokenized, so send at most that many bytes of the text (its end, "
                             "for truncation_side left) or its token ids", "prompt")


def truncated(ids: list[int], truncation: tuple[int, str] | None) -> list[int]:
    """The prompt ``ids`` cut to :func:`truncation_of`'s (tokens to keep, side)."""
    if truncation is None or len(ids) <= truncation[0]:
        return ids
    keep, side = truncation
    return ids[-keep:] if side == "left" else ids[:keep]
