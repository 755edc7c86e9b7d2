"""A /v1/completions ``prompt``: one prompt, or a batch as OpenAI's and vLLM 0.32's API take it (a
list of texts or of token-id lists), for the HTTP front end (no I/O)."""

from __future__ import annotations

from pydantic_core import PydanticCustomError

# prompts of one request at most: vLLM 0.32's VLLM_MAX_COMPLETION_PROMPTS default (each prompt x n
# choices is also a request of the queue: see choices.check_choices)
MAX_PROMPTS = 1024


def check_prompt_shape(prompt):
    """``prompt`` as sent, once a list has one of the shapes a prompt may have: token ids, or a
    batch (texts, or token-id lists), each prompt of a batch non-empty. Run before pydantic's type
    check, whose union errors would say "prompt.str: Input should be a valid string" for all of these.

    Raises:
        PydanticCustomError: neither a text nor a list, an empty list, a list mixing texts and id
            lists (or holding anything else), an empty text or id list inside a batch, an id that is
            no integer.
    """
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):  # pydantic's first union error would blame "prompt.str"
        raise _error(f"prompt is {_kind(type(prompt))}: send a text, token ids, or a list of texts or of "
                     "token-id lists")
    if not prompt:
        raise _error("prompt is an empty list: send a text, token ids, or a non-empty list of texts or of "
                     "token-id lists")
    # by type, in C (set(map(type, ...))): a body of up to 16 MiB holds millions of ids (a loop over them in
    # Python took ~1 s per 2M ids); 64k ids a call, so that other threads run between the calls
    types = set()
    for start in range(0, len(prompt), 1 << 16):
        types.update(map(type, prompt[start:start + (1 << 16)]))
    if types == {int}:
        return prompt  # one prompt of token ids
    kinds = {_kind(t) for t in types}
    if len(kinds) > 1 or not kinds <= {"a text", "a list"}:
        raise _error(f"prompt holds {' and '.join(sorted(kinds))}: a batch is a list of texts or a list of "
                     "token-id lists, one kind only")
    for i, item in enumerate(prompt):
        if not item:
            raise _error(f"prompt[{i}] is empty: every prompt of a batch needs at least one token")
        if isinstance(item, list) and set(map(type, item)) != {int}:
            bad = next(j for j, t in enumerate(item) if type(t) is not int)
            raise _error(f"prompt[{i}][{bad}] is {_kind(type(item[bad]))}: token ids are integers")
    return prompt


def prompts_of(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a validated ``prompt``: a batch's, or the one prompt alone."""
    return prompt if isinstance(prompt, list) and isinstance(prompt[0], str | list) else [prompt]


def _kind(kind: type) -> str:
    """What a JSON value of Python type ``kind`` is, in a message (JSON's true is a bool, no id)."""
    return {bool: "a boolean", int: "an integer", str: "a text", list: "a list", dict: "an object",
            type(None): "null"}.get(kind, "another value")


def _error(message: str) -> PydanticCustomError:
    return PydanticCustomError("prompt", message)
