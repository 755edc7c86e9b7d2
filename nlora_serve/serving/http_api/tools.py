"""Chat ``tools`` and ``tool_choice``, as vLLM 0.32 serves them (no I/O).

``tools`` go to the chat template (its ``tools`` variable) whatever the choice. ``tool_choice``:

- ``"none"`` (the default without tools): plain text, as vLLM.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is forced to a
  JSON object of the function's ``parameters`` schema (structured outputs; no parameters: any
  object) and returned as that function's one tool call, ``content`` ``""``, finish_reason the
  engine's (``"stop"``), as vLLM's parser path (parser/abstract_parser.py ``_extract_tool_calls``).
- ``"required"``: the output is forced to a JSON array of ``{"name", "parameters"}`` objects, one
  schema per tool (``maxItems`` 1 with ``parallel_tool_calls: false``; the tools' ``$defs`` joined
  at the array's top, where their ``#/$defs/...`` references resolve), each returned as a tool
  call (arguments re-serialized with ``json.dumps``), finish_reason ``"tool_calls"`` where the
  engine's is ``"stop"`` (tool_parsers/utils.py ``get_json_schema_from_tools``).
- ``"auto"`` (the default with tools): the model answers freely and its text is read by the
  server's tool-call parser (``serve --enable-auto-tool-choice --tool-call-parser hermes|llama3_json``,
  http_api/tool_parsers.py): the calls it finds are ``tool_calls`` (finish_reason ``"tool_calls"``),
  the text outside them ``content`` (null when none); no calls: the text. A server started
  without ``--enable-auto-tool-choice`` refuses it with vLLM 0.32's error.

vLLM 0.32 serves the named and required choices only with ``--tool-call-parser`` set (without it
it refuses them too); their answers do not depend on the parser (the JSON is forced), so they are
served here as vLLM serves them with one. Tool call ids are vLLM's ``chatcmpl-tool-<32 hex>``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.errors import shown


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"] = "function"
    function: ToolFunction

    def template_dict(self) -> dict:
        """The tool as vLLM hands it to the chat template (``strict`` only when set)."""
        function = self.function.model_dump(exclude={"strict"} if self.function.strict is None else set())
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """How a request's output is returned as tool calls: ``name`` for a named function, None for
    ``"required"`` or ``"auto"``; ``parallel`` False keeps the first call only
    (``parallel_tool_calls``); ``parser``: ``"auto"``'s tool-call parser (http_api/tool_parsers.py),
    None for the forced choices."""

    name: str | None
    parallel: bool = True
    parser: str | None = None

    @property
    def finish_as_tool_calls(self) -> bool:
        """vLLM's finish_reason rule: "tool_calls" for "required", the engine's for a named function
        ("auto": "tool_calls" where calls were found, http_api/tool_parsers.py's ``auto_answer``)."""
        return self.name is None and self.parser is None


_AUTO = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def tool_calls_of(tools: list[Tool] | None, tool_choice, choice_given: bool,
                  parallel: bool | None, auto_parser: str | None = None) -> tuple[ToolCalls | None, dict | None]:
    """(how the output returns as tool calls, the JSON schema that forces it, None for "auto");
    (None, None) for plain text. ``tool_choice`` as sent (a string or a dict), ``choice_given``
    whether it was; ``auto_parser``: the server's tool-call parser for "auto" (None: refused).

    Raises:
        RequestError: vLLM 0.32's refusals, in its words (``param`` as vLLM names it): ``tools``
            empty, a choice without tools, an unknown choice, a name no tool has, ``"auto"``.
    """
    if tools is not None and not tools:
        raise RequestError("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                           "entirely.", "tools")
    if not choice_given or tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return None, None
    if tools is None:
        raise RequestError("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if tool_choice == "auto":
        if auto_parser is None:
            raise RequestError(_AUTO, None)  # vLLM names no param
        return ToolCalls(None, parallel is not False, auto_parser), None
    if tool_choice == "required":
        schemas = [_call_schema(t.function) for t in tools]
        array = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": schemas}}
        if parallel is False:
            array["maxItems"] = 1
        defs = _joined_defs(tools)
        if defs:  # where the tools' "#/$defs/..." references resolve
            array["$defs"] = defs
        return ToolCalls(None, parallel is not False), array
    name = _named(tool_choice)
    # vLLM's map by name: of tools sharing the name, the last one's parameters are forced
    function = next((t.function for t in reversed(tools) if t.function.name == name), None)
    if function is None:
        raise RequestError("The tool specified in `tool_choice` does not match any of the specified `tools`",
                           "tool_choice")
    return ToolCalls(name, parallel is not False), function.parameters or {"type": "object", "properties": {}}


def _cut(value) -> str:
    """``value`` as vLLM's messages print it (``str``), cut to :data:`~nlora_serve.errors.SHOWN_CHARS`."""
    return shown(value if isinstance(value, str) else repr(value))


def _named(tool_choice) -> str:
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    if not isinstance(tool_choice, dict):
        raise RequestError(f"Invalid value for `tool_choice`: {_cut(tool_choice)}! Only named tools, \"none\", \"auto\" or "
                           "\"required\" are supported.", "tool_choice")
    function = tool_choice.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"Invalid value for `function`: `{_cut(function)}` in `tool_choice`! {usage}", "tool_choice")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"Invalid `name` in `function`: `{_cut(name)}` in `tool_choice`! {usage}", "tool_choice")
    if tool_choice.get("type", "function") != "function" or set(tool_choice) - {"type", "function"} \
            or set(function) != {"name"}:
        raise RequestError(f"Invalid value for `tool_choice`! {usage}", "tool_choice")
    return name


def _call_schema(function: ToolFunction) -> dict:
    """One element of the "required" array (vLLM's ``_get_tool_schema_from_name_and_params``), the
    parameters' ``$defs`` left out (:func:`_joined_defs` puts them at the top)."""
    parameters = {k: v for k, v in (function.parameters or {"type": "object", "properties": {}}).items()
                  if k != "$defs"}
    return {"properties": {"name": {"type": "string", "enum": [function.name]}, "parameters": parameters},
            "required": ["name", "parameters"]}


def _joined_defs(tools: list[Tool]) -> dict:
    """Every tool's parameters' ``$defs``, joined (vLLM's ``_get_tool_schema_defs``, which moves
    them to the "required" array schema's top, where ``#/$defs/...`` references resolve).

    Raises:
        RequestError: two tools define one name differently (vLLM's words, param ``tools``).
    """
    joined: dict = {}
    for tool in tools:
        defs = (tool.function.parameters or {}).get("$defs")
        for name, schema in (defs.items() if isinstance(defs, dict) else ()):
            if name in joined and joined[name] != schema:
                raise RequestError(f"Tool definition '{shown(name)}' has multiple schemas, which is not supported.", "tools")
            joined[name] = schema
    return joined


def call_id() -> str:
    """vLLM's random tool call id."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def whole_calls(tools: ToolCalls, text: str) -> list[dict]:
    """The tool calls of a whole answer ``text`` (vLLM's: a named function's text is its
    arguments, none when blank; "required" parses the array, none when it does not parse)."""
    if tools.name is not None:
        calls = [] if not text.strip() else [(tools.name, text)]
    else:
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                  for i in items):
            items = []
        calls = [(i["name"], json.dumps(i.get("parameters"), ensure_ascii=False)) for i in items]
    if not tools.parallel:
        calls = calls[:1]
    return [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls]

