"""Chat messages to prompt token ids, every message's content tokenized as text (DESIGN §6).

A chat template renders messages into one string, and tokenizing that string the usual way turns
all special-token text into control tokens, wherever it came from: a user whose content says
``<|im_end|>\\n<|im_start|>assistant\\n...`` forges turns (llama.cpp #26273, lmdeploy #4960). Here
each content's special-token text is swapped for a random sentinel before the template renders,
so the only special-token text left in the rendered string is the template's own markers. The
string is then cut at those markers, as Hugging Face tokenizers cut at added tokens, each marker
becomes its token id, and each text run between markers (the contents' special text put back) is
encoded with ``split_special_tokens=True``, i.e. as plain text. A chat whose contents hold no
special-token text is tokenized by ``apply_chat_template(tokenize=True)`` itself.
"""

from __future__ import annotations

import functools
import json
import re
import secrets

from nlora_serve.errors import shown
from nlora_serve.engine.api import text_bytes
from nlora_serve.engine.sample.sampling import RequestError

# "developer" is OpenAI's newer name for the system role: passed to a template that names it as it
# is, else made a system message (:func:`developer_as_system`), as vLLM 0.32 renders it
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# the message fields a client writes, masked against special-token text (a template may render
# ``name``, vLLM passes it to the template)
_TEXT_FIELDS = ("content", "name")


def encode_chat(messages: list[dict[str, str]], tokenizer, field: str = "messages",
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                kwargs: dict | None = None) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"}, optionally "name") under the tokenizer's chat template, with
    the assistant's generation prompt appended (unless ``add_generation_prompt`` is False), or the
    final message left open for the model to continue (``continue_final_message``, transformers'
    and vLLM's: the rendering ends where its content ends); no content text ever becomes a special
    token. ``kwargs``: more template variables (:func:`template_kwargs`).

    Raises:
        RequestError: the template changes content text so that the sentinels do not survive
            rendering, or (continue_final_message) the final message's content is not in the
            rendering, or special-token text inside tool calls or template variables (``kwargs``:
            tools, documents, ...), which are not masked (the message names ``field``).
    """
    messages = developer_as_system(messages, tokenizer.chat_template)
    specials = _special_texts(tokenizer)
    # only content and name are masked: special-token text anywhere else is refused, never a forged control token
    check_plain([[m.get("tool_calls"), m.get("tool_call_id")] for m in messages] + [kwargs], tokenizer,
                f"{field}: special-token text {{hit!r}} inside tool calls, tools or template variables")
    template = functools.partial(_apply_template, tokenizer, field, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, **(kwargs or {}))
    if not any(s in m[key] for m in messages for key in _TEXT_FIELDS if key in m for s in specials):
        return template(messages, tokenize=True, return_dict=False)
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}.{k}\ue001" for k in range(len(specials))]
    special_re = re.compile("|".join(re.escape(s) for s in specials))
    masked = [dict(m, **{key: special_re.sub(lambda hit: marks[specials.index(hit.group())], m[key])
                         for key in _TEXT_FIELDS if key in m}) for m in messages]
    rendered = template(masked, tokenize=False)
    real = template(messages, tokenize=False)
    mark_re = re.compile(f"\ue000{nonce}\\.(\\d+)\ue001")
    pieces = [mark_re.sub(lambda hit: specials[int(hit.group(1))], p)
              for p in re.split(f"({special_re.pattern})", rendered)]
    if "".join(pieces) != real:
        raise RequestError(f"{field}: this model's chat template rewrites message text holding special-token "
                           "text, which therefore cannot be kept as plain text; remove the special-token text")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:  # re.split puts the template's own markers at odd positions
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
    return ids


def developer_as_system(messages: list[dict], template) -> list[dict]:
    """``messages`` as vLLM 0.32 renders them (renderers/hf.py) where the chat ``template`` (a string)
    never names the role "developer" (in quotes): each developer message a system message (its
    ``tools`` dropped), and where a system message is then not first, or not alone, all of them
    merged into one first ``{"role": "system", "content"}``, their non-empty contents joined by a
    blank line (a content's text parts by a newline). SmolLM2's template would otherwise write a
    ``<|im_start|>developer`` turn after its default system prompt. Unchanged otherwise."""
    template = template if isinstance(template, str) else ""
    if not any(m["role"] == "developer" for m in messages) or '"developer"' in template or "'developer'" in template:
        return messages
    converted = [{k: v for k, v in m.items() if k != "tools"} | {"role": "system"} if m["role"] == "developer"
                 else m for m in messages]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems in ([], [0]):
        return converted
    contents = []
    for i in systems:
        content = converted[i].get("content") or ""
        if isinstance(content, list):
            content = "\n".join(p["text"] if isinstance(p, dict) else p for p in content
                                if isinstance(p, str) or (isinstance(p, dict) and "text" in p))
        if content:
            contents.append(content)
    return [{"role": "system", "content": "\n\n".join(contents)}] + [m for m in converted if m["role"] != "system"]


def check_plain(value, tokenizer, what: str) -> None:
    """Refuse special-token text anywhere in ``value`` (JSON-like: its strings and keys), which the
    template would render unmasked.

    Raises:
        RequestError: ``what`` (formatted with ``hit``, the special-token text found) followed by
            "cannot be kept as plain text; remove it".
    """
    text = json.dumps(value, ensure_ascii=False, default=str)
    hit = next((s for s in _special_texts(tokenizer) if s in text), None)
    if hit is not None:
        raise RequestError(what.format(hit=hit) + " cannot be kept as plain text; remove it")


def _apply_template(tokenizer, field: str, messages: list[dict[str, str]], **options):
    """``tokenizer.apply_chat_template(messages, **options)``.

    Raises:
        RequestError: transformers' ValueError (with continue_final_message: the final content is
            not in the rendering), naming ``field``; the template's own refusal of the messages
            (its ``raise_exception``: Gemma's "System role not supported", Mistral's and Llama 2's
            "Conversation roles must alternate user/assistant/...") or an error rendering them (a
            Jinja TemplateError or TypeError: a tool call without its function), as vLLM's 400
            for these, where they escaped as a 500.
    """
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **options)
    except ValueError as exc:
        raise RequestError(f"{field}: {exc}") from None
    except (jinja2.TemplateError, TypeError) as exc:
        raise RequestError(f"{field}: the model's chat template cannot render these messages: "
                           f"{shown(str(exc) or type(exc).__name__)}") from None


# apply_chat_template's own arguments: never template variables from a request
_RESERVED = frozenset({"conversation", "messages", "chat_template", "tokenize", "add_generation_prompt",
                       "continue_final_message", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_kwargs(tokenizer, requested: dict, extra: dict) -> dict:
    """The template variables a request sets: ``requested`` (vLLM's ``chat_template_kwargs``) with
    ``extra`` (tools, documents, ...: the request's own fields, which win where not None) over it,
    kept where the model's chat template reads them, as vLLM 0.32 keeps them
    (renderers/hf.py ``resolve_chat_template_kwargs``): another key changes nothing.

    Raises:
        RequestError: ``chat_template`` or ``tokenize`` among ``requested`` (vLLM refuses both).
    """
    if requested.get("chat_template") is not None:
        raise RequestError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.")
    if "tokenize" in requested:
        raise RequestError("Found unexpected chat template kwargs from request: {'tokenize'}")
    merged = requested | {k: v for k, v in extra.items() if v is not None}
    template = tokenizer.chat_template
    variables = _template_variables(template if isinstance(template, str) else "")
    return {k: v for k, v in merged.items() if k in variables and k not in _RESERVED}


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2
    from jinja2 import meta

    return frozenset(meta.find_undeclared_variables(jinja2.Environment().parse(template)))


def _special_texts(tokenizer) -> list[str]:
    """The text of every special added token, longest first (so a regex prefers the longest)."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(texts, key=len, reverse=True)


def check_message_count(count: int, field: str, max_messages: int | None) -> None:
    """Refuse more than ``max_messages`` (max_model_len) chat messages: each renders at least its
    turn marker, a token, so more never fit the context (None: no bound).

    Raises:
        RequestError: naming ``field`` and the count.
    """
    if max_messages is not None and count > max_messages:
        raise RequestError(f"{field} holds {count:,} messages: more turns than the model's context holds "
                           f"tokens (max_model_len {max_messages}; refused before rendering)")


def render_chat(messages: list[dict[str, str]], tokenizer, field: str, max_bytes: int | None = None,
                max_messages: int | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, kwargs: dict | None = None) -> list[int]:
    """Token ids of chat ``messages`` ({"role", "content"}, optionally "name") under the model's chat template, with the
    assistant's generation prompt appended (unless ``add_generation_prompt`` is False; see
    :func:`encode_chat` for ``continue_final_message``); content text
    is tokenized as text, never as special tokens (:func:`encode_chat`). ``max_bytes``: contents longer
    than this in all (UTF-8) surely exceed the context (:func:`~nlora_serve.engine.api.max_prompt_bytes`);
    ``max_messages``: so do more messages (max_model_len: each renders at least its turn marker).

    Raises:
        RequestError: no messages, a role not in :data:`CHAT_ROLES`, contents (with the tool calls'
            and template variables' JSON) over ``max_bytes`` bytes or over ``max_messages`` messages
            (refused before the template renders them: a 15 MB message, or 300k empty ones, held
            the front ends' one tokenizer thread, so every tenant's requests, for 6-30 s; 4 MB of
            tool call arguments 4.3 s), values (tool call arguments, tools, template variables)
            nested deeper than the renderer recurses, or from :func:`encode_chat` (the message names
            ``field``).
    """
    if not messages:
        raise RequestError(f"{field} has no messages")
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            role = shown(str(message['role']))
            raise RequestError(f"{field}[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
    check_message_count(len(messages), field, max_messages)
    size = sum(text_bytes(message[key]) for message in messages for key in _TEXT_FIELDS if key in message)
    if max_bytes is not None and size > max_bytes:
        raise RequestError(f"{field} hold {size:,} bytes of content (UTF-8): more tokens than the model's context "
                           f"holds (max_model_len; refused before tokenizing above {max_bytes:,} bytes)")
    try:
        if max_bytes is not None:  # tool calls and tools render too (a template may skip them: counted anyway)
            structured = text_bytes(json.dumps([m.get("tool_calls") for m in messages if m.get("tool_calls")]
                                               + [kwargs or {}], ensure_ascii=False, default=str))
            if size + structured > max_bytes:
                raise RequestError(f"{field} hold {structured:,} bytes of tool calls, tools and template variables "
                                   f"(JSON, UTF-8) and {size:,} of content: more tokens than the model's context "
                                   f"holds (max_model_len; refused before tokenizing above {max_bytes:,} bytes)")
        return encode_chat(messages, tokenizer, field, add_generation_prompt, continue_final_message, kwargs)
    except RecursionError:  # transformers and Jinja walk values recursively: a 500 and its trace before
        raise RequestError(f"{field}: tool calls, tools or template variables are nested too deeply to render "
                           "(JSON values nested some hundreds of levels)") from None
