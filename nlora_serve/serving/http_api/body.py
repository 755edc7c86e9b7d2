"""The body of an HTTP API request (generation, /tokenize, /detokenize): parsed as FastAPI parses a
declared JSON body, then validated into a request model, each failure a
:class:`RequestValidationError` (HTTP 400 in OpenAI's error shape, see routes.py). The routes
parse the body themselves, after the key and the grant are checked (FastAPI would parse a declared
body before any dependency)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from nlora_serve.errors import shown
from nlora_serve.serving.http_api.body_gc import full_collections_held, let_go
from nlora_serve.serving.http_api.body_json import TooDeep, loads_in_pieces
from nlora_serve.serving.http_api.body_pieces import PieceErrors, validate_in_pieces


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF (halves of a pair, or lone)
T = TypeVar("T")
Body = TypeVar("Body", bound=BaseModel)  # a request model: CompletionRequest, ChatRequest, TokenizeText, ...
# bodies over this are parsed in pieces (body_json.py) and, with their validation, off the event loop
# (:func:`off_loop`): json.loads of 64 KiB holds the GIL ~2 ms on a loaded 2-core box
PIECES_CHARS = 64 << 10
# large bodies' threads, their own: on asyncio's default pool (6 threads on 2 cores), a few crafted bodies
# (escaped strings, 65-pair objects: 3-8 s of CPU each at 16 MiB, 9-15x json.loads') held every thread
# that finishes tenants' whole (non-streamed) responses (generate.py) and the admin's loads for seconds
BODY_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nlora-body")


async def off_loop(size: int, work: Callable[..., T], *args) -> T:
    """``work(*args)``: here for a body of ``size`` bytes up to :data:`PIECES_CHARS`, else on one of
    :data:`BODY_THREADS`, where its pieces (:func:`parsed_json`, :func:`validated`) let the event loop
    run between them. Raises what ``work`` raises."""
    if size <= PIECES_CHARS:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(BODY_THREADS, functools.partial(work, *args))


async def read_off_loop(raw: bytes, content_type: str | None, check: Callable[[object], None],
                        read: Callable[..., T], *args) -> T:
    """``read(data, *args)`` after ``check(data)``, ``data`` the body parsed (:func:`parsed_json`),
    all in one :func:`off_loop` call: a large body lives and dies in its body thread, its pieces
    letting the loop run, the collector's full passes held off until it is freed, in pieces
    (body_gc.py; a refused body is freed there, not on the loop: the traceback's frames are
    cleared of it, their lines kept).

    Raises:
        RequestValidationError: from :func:`parsed_json`. What ``check`` and ``read`` raise.
    """
    return await off_loop(len(raw), _parse_and_read, raw, content_type, check, read, args)


def _parse_and_read(raw: bytes, content_type: str | None, check, read, args):
    large = len(raw) > PIECES_CHARS
    with full_collections_held(large):
        box = [parsed_json(raw, content_type)]
        try:
            check(box[0])
            return read(box[0], *args)
        except BaseException as exc:
            _clear_frames(exc)
            raise
        finally:
            if large:  # freed in pieces, what no validated model or error holds
                let_go(box)


def _clear_frames(exc: BaseException) -> None:
    """The locals of the finished frames in ``exc``'s traceback and those of the exceptions it
    chains (``read``'s own ``data``) let go; the traceback's lines stay."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def check_content_encoding(encoding: str | None) -> None:
    """Refuse a body sent with a ``Content-Encoding`` header other than ``identity``: neither this
    server nor Starlette decodes one, so a gzip body was refused as "not valid JSON (at character 1)"
    (vLLM's answer: a JSON decode error, a 400 as here; RFC 9110's would be a 415).

    Raises:
        RequestValidationError: naming the encoding (cut, see :func:`~nlora_serve.errors.shown`).
    """
    if encoding is None or all(coding.strip().lower() in ("", "identity") for coding in encoding.split(",")):
        return
    raise _body_error(f"the request body's Content-Encoding {shown(encoding.strip(), 40)!r} is not supported; "
                      "send the JSON body uncompressed, without a Content-Encoding header")


def parsed_json(raw: bytes, content_type: str | None):
    """The parsed body, as FastAPI parses a declared one: JSON when the content type is absent or
    JSON (``application/json``, ``application/*+json``).

    Raises:
        RequestValidationError: an empty body or another content type (``curl -d`` sends
            ``application/x-www-form-urlencoded``; the message names it), not JSON (FastAPI's
            ``json_invalid`` error, with the character offset), nested deeper than the parser
            recurses, an integer of more digits than Python converts (refused as out of range,
            naming its field: see :func:`_refuse_long_ints`), or a string holding a lone UTF-16
            surrogate (``"\\ud800"`` is valid JSON but no Unicode text: the tokenizer and the UTF-8
            error body would fail on it with a 500).
    """
    if not raw:
        raise _body_error("the request body is empty; expected a JSON object")
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise _body_error(f"Content-Type {shown(kind, 80)!r} is not JSON; send the JSON body with "
                          "'Content-Type: application/json'")
    try:
        # decoded strictly: json.loads(bytes) would pass encoded surrogates (b"\\xed\\xa0\\x80") through
        text = raw.decode(json.detect_encoding(raw))
        data = _loads(text)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
        at = getattr(exc, "pos", getattr(exc, "start", 0))
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", at), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": str(exc)}}]) from None
    except RecursionError as exc:  # a large body's (body_json.TooDeep) says how deep the parser goes
        raise _body_error(f"JSON {exc}" if isinstance(exc, TooDeep) else "JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and not _is_unicode(data):  # strict text: only escapes make surrogates
        raise _body_error("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): not valid Unicode")
    return data


def _loads(text: str):
    """``json.loads(text)``; an integer past Python's digit limit is refused as out of range.

    Raises:
        JSONDecodeError: not JSON. RecursionError: nested past the parser.
        RequestValidationError: from :func:`_refuse_long_ints`.
    """
    try:  # a large body in pieces: json.loads holds the GIL for all of it (~0.3 s for 16 MiB)
        return loads_in_pieces(text) if len(text) > PIECES_CHARS else json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # int() refused a digit string: parse again (rare), keeping long ones as text
        long_ints: list[_LongInt] = []
        parse_int = functools.partial(_parse_int, long_ints=long_ints)
        # a large body in pieces again: json.loads of it all held the GIL ~0.2 s (16 MiB, one long int at its end)
        data = (loads_in_pieces(text, parse_int) if len(text) > PIECES_CHARS else json.loads(text, parse_int=parse_int))
        _refuse_long_ints(data)
        return data


class _LongInt:
    """A JSON integer of more digits than Python converts (``sys.get_int_max_str_digits()``,
    4300 by default, a guard against quadratic-time conversion): out of every field's range."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        digits = self.text.lstrip("-")
        return f"{self.text[:len(self.text) - len(digits) + 8]}... ({len(digits)} digits)"


def _parse_int(text: str, long_ints: list[_LongInt]) -> int | _LongInt:
    limit = sys.get_int_max_str_digits()
    if limit and len(text.lstrip("-")) > limit:
        long_ints.append(_LongInt(text))
        return long_ints[-1]
    return int(text)


def _refuse_long_ints(data) -> None:
    """Refuse a :class:`_LongInt` as out of range, like any too large value, naming the top-level
    field that holds it as ``param`` (and where inside it in the message); in a body that is no
    object, the body (a _LongInt left in it made the refusal's ``json.dumps`` a 500).

    Raises:
        RequestValidationError: the first one found.
    """
    for field, value in data.items() if isinstance(data, dict) else [("body", data)]:
        stack = [(value, field)]  # not recursive: the parser accepts nesting deeper than a walk could
        while stack:
            item, path = stack.pop()
            if isinstance(item, _LongInt):
                what = f"{item}" if path == field else f"{path} = {item}"
                loc = ("body", field) if isinstance(data, dict) else ("body",)
                raise RequestValidationError([{"type": "value_error", "loc": loc, "input": {},
                                               "msg": f"{what} is out of range"}])
            if isinstance(item, list):
                stack += [(v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item)))]
            elif isinstance(item, dict):
                stack += [(v, f"{path}.{k}") for k, v in reversed(list(item.items()))]


def _body_error(message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": message, "input": {}}])


def _is_unicode(data) -> bool:
    """False when a string in the parsed JSON ``data`` (a key or a value) cannot be encoded as UTF-8.
    Walked a list's :data:`_UNICODE_PIECE` items at a time (a ``json.dumps`` of it all held the GIL
    ~0.6 s for 2.6M ids)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [list(item), list(item.values())]
        elif isinstance(item, list):
            for start in range(0, len(item), _UNICODE_PIECE):
                piece = item[start:start + _UNICODE_PIECE]
                if not _encodes("".join([x for x in piece if type(x) is str])):
                    return False
                stack += [x for x in piece if type(x) is list or type(x) is dict]
        elif isinstance(item, str) and not _encodes(item):
            return False
    return True


_UNICODE_PIECE = 4096


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def validated(kind: type[Body], data) -> Body:
    """``data`` as a ``kind`` request, validated as strictly as FastAPI would a declared body.

    Raises:
        RequestValidationError: the first field that does not validate comes first.
    """
    if not isinstance(data, dict):  # pydantic would say "a valid dictionary or instance of ChatRequest"
        raise _body_error(f"expected a JSON object, got {_JSON_KINDS.get(type(data), 'a value')}: "
                          f"{json.dumps(data)[:40]}")
    try:
        return validate_in_pieces(kind, data)  # kind.model_validate(data), with the GIL free between pieces
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    except PieceErrors as exc:
        errors = exc.errors
    errors = [_saying_what_was_sent(error) for error in errors]
    raise RequestValidationError(without_union_labels(errors, data)) from None


def _saying_what_was_sent(error: dict) -> dict:
    """A wrong-type error (``Input should be a valid boolean``) with the value sent added: ", got 0"
    (JSON, at most 40 characters, or the JSON kind of an object or array)."""
    if not (error.get("type", "").endswith("_type") or error.get("type") == "literal_error") or "input" not in error:
        return error
    value = error["input"]
    got = (_JSON_KINDS[type(value)] if isinstance(value, dict | list) else
           json.dumps(value)[:40] if isinstance(value, str | int | float | bool | None) else None)
    return error if got is None else {**error, "msg": f"{error.get('msg')}, got {got}"}


_MAX_BRANCHES_SHOWN = 4  # a union's other members named in the message


def without_union_labels(errors: list[dict], data) -> list[dict]:
    """pydantic's ``errors`` for ``data`` with each union member's label taken out of ``loc``, so
    that the error names the field the client sent (``tool_choice``, ``stop``,
    ``messages.0.content``), not the member's type (``tool_choice.str``: its first member only,
    whatever was wrong). The message of such an error says the member it is about and what each
    other member of the union found.

    A label is a ``loc`` part that is no key (dict) or index (list) of ``data`` at that point; the
    last part of a ``missing`` error names the absent field and stays. Errors outside a union are
    returned as they are.
    """
    walked = [_walk(e.get("loc", ()), data, e.get("type") == "missing") for e in errors]
    # per union (where its label sits in loc, the loc before it): each member's first error, in order;
    # linear in the errors (comparing each error with every other took 38 s for 8,000 errors)
    members: dict[tuple, dict[str, tuple[dict, tuple]]] = {}
    for error, (where, labels) in zip(errors, walked):
        if labels:
            at, label = labels[0]
            members.setdefault((at, tuple(error["loc"])[:at]), {}).setdefault(label, (error, where))
    out = []
    for error, (where, labels) in zip(errors, walked):
        if not labels:
            out.append(error)
            continue
        at, label = labels[0]
        alternatives = []
        for other_label, (other, other_where) in members[at, tuple(error["loc"])[:at]].items():
            if other_label == label:
                continue
            if len(alternatives) == _MAX_BRANCHES_SHOWN:
                break
            inside = f"at {'.'.join(map(str, other_where))}: " if other_where != where else ""
            alternatives.append(f"as {other_label}: {inside}{other.get('msg')}")
        msg = f"{error.get('msg')} (as {label})" + "".join(f"; or {a}" for a in alternatives)
        out.append({**error, "loc": where, "msg": msg})
    return out


def _walk(loc, data, missing: bool) -> tuple[tuple, list[tuple[int, str]]]:
    """(``loc`` without union labels, [(index in ``loc``, label)]) following ``loc`` through ``data``."""
    where, labels, here, found = [], [], data, True
    for i, part in enumerate(loc):
        if found and isinstance(here, dict) and isinstance(part, str) and part in here:
            here = here[part]
        elif found and isinstance(here, list) and type(part) is int and -len(here) <= part < len(here):
            here = here[part]
        elif missing and i == len(loc) - 1:  # the absent field a "missing" error names
            found = False
        elif isinstance(part, str):
            labels.append((i, part))
            continue
        else:
            found = False
        where.append(part)
    return tuple(where), labels
