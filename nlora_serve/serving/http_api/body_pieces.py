"""A request model validated in pieces: the same model, or the same errors in the same order, as one
``kind.model_validate(data)``, with the GIL free between the pieces.

pydantic-core holds the GIL for the whole of one validation call: a chat of 131,072 messages (a
128k-token model's limit, 4 MB) took ~2 s of it, 1,024 prompts of 1,000 token ids ~0.15 s, and
every other tenant's stream (the event loop) and the engine's step thread waited, even with the
validation in a worker thread. Here:

- a list field (``list[X]`` or ``list[X] | None``, no constraints) of more than :data:`PIECE`
  items is validated :data:`PIECE` items at a time (a ``TypeAdapter`` of the same list type and
  strictness), the rest of the body with ``[]`` in its place; item errors get the field and the
  item's index in front of their ``loc`` and take the field's place among the other fields' errors
  (pydantic reports errors in field order);
- a completion ``prompt`` list is checked by its before-validator
  (:func:`~nlora_serve.serving.http_api.prompts.check_prompt_shape`, Python: the interpreter
  switches threads inside it) and, once its shape is known good (then pydantic's check of it
  cannot fail and keeps every value), the model is validated with one item of it in its place;
  a bad shape is validated whole, as before (the check refuses it before pydantic looks further).

The validated model then holds the lists themselves (pydantic would hold equal copies).
"""

from __future__ import annotations

import functools
import types
import typing

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from nlora_serve.serving.http_api.prompts import check_prompt_shape

PIECE = 256  # items of a list per validation call (256 chat messages: ~4 ms on a loaded 2-core box)


class PieceErrors(Exception):
    """The errors (pydantic's ``errors(include_url=False)`` dicts) of a body validated in pieces."""

    def __init__(self, errors: list[dict]):
        super().__init__(f"{len(errors)} validation errors")
        self.errors = errors


def validate_in_pieces(kind: type[BaseModel], data: dict) -> BaseModel:
    """``kind.model_validate(data)``, in pieces where ``data`` holds long lists (module docstring).

    Raises:
        ValidationError: from a validation of the body as it is. PieceErrors: the same errors,
            collected from the pieces.
    """
    prompt = data.get("prompt")
    if "prompt" in kind.model_fields and isinstance(prompt, list) and prompt:
        try:
            check_prompt_shape(prompt)
        except PydanticCustomError:
            return kind.model_validate(data)  # refused by the same check, before the list is looked at further
        data = {**data, "prompt": [prompt[0][:1]] if isinstance(prompt[0], list) else prompt[:1]}
    long = [name for name in _list_fields(kind) if isinstance(data.get(name), list) and len(data[name]) > PIECE]
    items, errors = {}, {}
    for name in long:
        items[name], errors[name] = _pieces(_adapter(kind, name), data[name], name)
    try:
        body = kind.model_validate({**data, **{name: [] for name in long}}) if long else kind.model_validate(data)
        rest = []
    except ValidationError as exc:
        if not long:
            raise
        rest = exc.errors(include_url=False)
    if rest or any(errors.values()):
        order = {name: i for i, name in enumerate(kind.model_fields)}
        tagged = [(order.get(e["loc"][0] if e["loc"] else None, len(order)), e) for e in rest]
        tagged += [(order[name], e) for name in long for e in errors[name]]
        raise PieceErrors([e for _, e in sorted(tagged, key=lambda pair: pair[0])])  # stable: each field's own order
    for name in long:
        body.__dict__[name] = items[name]
    if "prompt" in kind.model_fields and isinstance(prompt, list) and prompt:
        body.__dict__["prompt"] = prompt
    return body


def _pieces(adapter: TypeAdapter, values: list, name: str) -> tuple[list, list[dict]]:
    """(the validated items, their errors with ``(name, index)`` in front of each ``loc``)."""
    out, errors = [], []
    for start in range(0, len(values), PIECE):
        try:
            out += adapter.validate_python(values[start:start + PIECE])
        except ValidationError as exc:
            errors += [{**e, "loc": (name, start + e["loc"][0], *e["loc"][1:])} for e in exc.errors(include_url=False)]
    return out, errors


@functools.cache
def _list_fields(kind: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``kind`` typed ``list[X]`` or ``list[X] | None``, without constraints and without
    a validator that would see the ``[]`` put in their place (none where ``kind`` has a model validator)."""
    decorators = kind.__pydantic_decorators__
    if decorators.model_validators:
        return ()
    checked = {field for d in decorators.field_validators.values() for field in d.info.fields}
    return tuple(name for name, info in kind.model_fields.items()
                 if _list_type(info.annotation) and not info.metadata and not checked & {name, "*"})


@functools.cache
def _adapter(kind: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(_list_type(kind.model_fields[name].annotation),
                       config=ConfigDict(strict=kind.model_config.get("strict", False)))


def _list_type(annotation):
    """``list[X]`` of ``list[X]`` or ``list[X] | None``; else None."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(annotation)) != 2:
            return None
        annotation = args[0]
    return annotation if typing.get_origin(annotation) is list else None
