"""The OpenAI ``response_format`` and vLLM's ``structured_outputs`` -> the engine's StructuredOutputs.

Both endpoints take, as vLLM 0.32 does: ``response_format`` ``{"type": "text"}`` (free text),
``{"type": "json_object"}`` (any JSON object) and ``{"type": "json_schema", "json_schema": {"name",
"schema", "description", "strict"}}`` (JSON following the schema; ``strict`` and the name change
nothing, as in vLLM); and, in ``extra_body``, ``structured_outputs`` with exactly one of ``json``
(a schema, as an object or JSON text), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF,
xgrammar's dialect) or ``json_object: true``, and vLLM's ``disable_any_whitespace`` (JSON without
whitespace outside its strings). Both fields together is vLLM's way to give response_format that
option: ``structured_outputs`` then holds options only. The engine compiles the spec before the
request queues (engine/structured_output/structured.py): one that does not compile is a 400 naming the field it came
in. vLLM's other options (whitespace_pattern, structural tags, ...) are refused.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.errors import shown


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict = Field(alias="schema")  # OpenAI's "schema" (a BaseModel attribute's name in pydantic)
    strict: bool | None = None  # vLLM takes and ignores it: the grammar is always strict


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: str | dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace (vLLM's option)


def _first_error(exc: ValidationError, field: str) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in (field, *error["loc"]))
    return f"{shown(where)}: {error['msg']}"  # where holds the client's keys (an unknown field's)


def structured_of(response_format: dict | None, structured_outputs: dict | None) -> StructuredOutputs | None:
    """The request's constraint; None for free text (neither field, or ``{"type": "text"}``).

    Raises:
        RequestError: a malformed field, both fields set, a json_schema without its schema, or
            none / several constraints in structured_outputs (``param`` names the field). Whether
            the spec compiles is checked by the engine (:meth:`LLMEngine.check_structured`).
    """
    options = _options(structured_outputs)
    if response_format is not None and structured_outputs is not None:
        if any(getattr(options, k) not in (None, False) for k in ("json_", "regex", "choice", "grammar", "json_object")):
            raise RequestError("response_format and a structured_outputs constraint, not both: with response_format "
                               "structured_outputs holds options only (disable_any_whitespace)", "structured_outputs")
    if response_format is not None:
        try:
            fmt = _ResponseFormat.model_validate(response_format)
        except ValidationError as exc:
            raise RequestError(_first_error(exc, "response_format"), "response_format") from None
        if fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputs(json_object=True, param="response_format",
                                     disable_any_whitespace=options.disable_any_whitespace)
        if fmt.json_schema is None:
            raise RequestError("response_format of type 'json_schema' needs its 'json_schema' field "
                               "({'name': ..., 'schema': {...}})", "response_format")
        return StructuredOutputs(json=json.dumps(fmt.json_schema.schema_), param="response_format",
                                 disable_any_whitespace=options.disable_any_whitespace)
    if structured_outputs is None:
        return None
    spec = options
    schema = spec.json_ if not isinstance(spec.json_, dict) else json.dumps(spec.json_)
    return StructuredOutputs(json=schema, regex=spec.regex, grammar=spec.grammar, json_object=bool(spec.json_object),
                             choice=tuple(spec.choice) if spec.choice is not None else None,
                             disable_any_whitespace=spec.disable_any_whitespace)


def _options(structured_outputs: dict | None) -> _StructuredOutputs:
    """The parsed field (all None when absent).

    Raises:
        RequestError: a malformed field, naming it.
    """
    try:
        return _StructuredOutputs.model_validate(structured_outputs or {})
    except ValidationError as exc:
        raise RequestError(_first_error(exc, "structured_outputs"), "structured_outputs") from None
