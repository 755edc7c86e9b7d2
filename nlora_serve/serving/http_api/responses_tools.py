"""Responses API function tools, ``tool_choice`` and tool-call input items as the chat request
fields they run as (no I/O): /v1/chat/completions' tools (http_api/tools.py) serve them.

As vLLM 0.32 serves them (entrypoints/openai/responses: protocol.py's ``check_tool_usage``,
utils.py's ``construct_tool_dicts`` and ``construct_chat_messages_with_tool_call``):

- ``tools``: function tools in the Responses API's flat form (``{"type": "function", "name",
  "description", "parameters", "strict"}``), given to the chat template as chat's
  ``{"type": "function", "function": {...}}``; ``[]`` is no tools.
- ``tool_choice``: ``"required"`` and ``{"type": "function", "name"}``: the output is forced to the
  calls' JSON and returned as ``function_call`` items, as chat's ``"required"`` / named function
  (vLLM with ``--enable-auto-tool-choice`` and a ``--tool-call-parser`` that serves them from the
  forced JSON: vLLM builds no tool parser without that flag, and then answers text whatever the
  choice). ``"auto"`` (the default) with tools on a server started with
  ``--enable-auto-tool-choice --tool-call-parser NAME``: the answer's text is read by that parser
  (http_api/tool_parsers.py), its calls ``function_call`` items after a message item of the text
  outside them (none when that is empty), as vLLM's ``build_response_output_items``. ``"none"``,
  and ``"auto"`` on a server without the flag: the tools reach the chat template and the answer
  is text, as vLLM's (its Responses route, unlike its chat route, does not refuse "auto" then).
  Without tools, ``"auto"`` / ``"none"`` are ``"none"`` and the others are refused in
  vLLM's words.
- input items: ``function_call`` is an assistant message's tool call (joined to the assistant
  message before it, as vLLM joins them), ``function_call_output`` a ``tool`` message; an assistant
  message right after a call-only assistant message becomes its content.

Refused, naming the field: tools of other types (hosted tools, MCP, custom, namespaces: vLLM
serves them with a tool server or a harmony model only), other ``tool_choice`` forms, a
``function_call_output`` whose ``output`` is not a string.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nlora_serve.errors import shown
from nlora_serve.serving.http_api.request_models import ParamError


class FunctionTool(BaseModel):
    """A function tool in the Responses API's flat form."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    def chat_tool(self) -> dict:
        """The tool as chat's ``tools`` entry (``strict`` only when set, as vLLM's FunctionDefinition)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}

    def echo(self) -> dict:
        """The tool as vLLM 0.32 echoes it (OpenAI's FunctionTool dumped by alias)."""
        return {"name": self.name, "parameters": self.parameters, "strict": self.strict, "type": "function",
                "allowed_callers": None, "async": None, "defer_loading": None, "description": self.description,
                "output_schema": None}


class FunctionCallItem(BaseModel):
    """An input ``function_call`` item (an earlier response's call fed back). The null fields of
    the item as this server writes it are accepted at null only."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text (the chat template gets it parsed, as chat's assistant tool_calls)
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    namespace: None = None
    caller: None = None
    async_: None = Field(None, alias="async")
    created_by: str | None = None


class FunctionCallOutputItem(BaseModel):
    """An input ``function_call_output`` item: a call's result, a ``tool`` message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def function_tools(tools: list | None) -> list[FunctionTool]:
    """``tools`` validated (``[]``: none).

    Raises:
        ParamError: a tool not a function tool (param ``tools``), one that does not validate, one
            whose ``parameters`` hold NaN or Infinity (the response echoes them as JSON).
    """
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            what = f"a {shown(kind)!r} tool" if isinstance(kind, str) else "not a tool object"
            raise ParamError(f"tools[{i}] is {what}: this server serves function tools only ({{'type': 'function', "
                             "'name', 'description', 'parameters', 'strict'}; vLLM 0.32 runs the others with a tool "
                             "server or a harmony model only)", "tools")
        try:
            out.append(FunctionTool.model_validate(tool))
        except ValueError as exc:
            error = exc.errors(include_url=False)[0]
            where = "".join(f".{part}" for part in error["loc"])
            raise ParamError(f"tools[{i}]{where}: {error['msg']}", "tools") from None
    try:  # one pass over all: the response echoes them, and JSON has no NaN (Python's parser takes it)
        json.dumps([tool.parameters for tool in out], allow_nan=False)
    except ValueError:
        bad = next(i for i, tool in enumerate(out) if not _finite(tool.parameters))
        raise ParamError(f"tools[{bad}].parameters holds NaN or Infinity, which JSON has no number for", "tools") \
            from None
    return out


def _finite(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def chat_tool_choice(tool_choice, tools: list[FunctionTool], auto: bool = False) -> tuple[str | dict, str | dict]:
    """(the choice as vLLM echoes it, the chat request's ``tool_choice``); ``auto``: the server
    parses "auto"'s calls (--enable-auto-tool-choice), else "auto" runs as "none".

    Raises:
        ParamError: vLLM 0.32's refusals in its words ("required" or a named function without
            tools, a name no tool has), a form other than a string or ``{"type": "function", "name"}``,
            an empty name.
    """
    tool_choice = "auto" if tool_choice is None else tool_choice
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    if named and (set(tool_choice) != {"type", "name"} or not isinstance(tool_choice["name"], str)):
        raise ParamError("tool_choice of type 'function' takes 'name' (a string) only: "
                         "{'type': 'function', 'name': ...}", "tool_choice")
    if named and not tool_choice["name"]:  # chat refuses it later, in the words of chat's form
        raise ParamError("tool_choice.name is empty: name one of the tools ({'type': 'function', 'name': ...})",
                         "tool_choice")
    if not named and tool_choice not in ("auto", "none", "required"):
        raise ParamError(f"tool_choice {shown(repr(tool_choice))} is not supported: this server takes 'auto', 'none', "
                         "'required' or {'type': 'function', 'name': ...}", "tool_choice")
    if not tools:
        if tool_choice == "required":
            raise ParamError("Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice")
        if named:
            raise ParamError("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")
        return "none", "none"
    if named:
        if tool_choice["name"] not in {tool.name for tool in tools}:
            raise ParamError("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")
        return {"name": tool_choice["name"], "type": "function"}, {"type": "function",
                                                                    "function": {"name": tool_choice["name"]}}
    return tool_choice, "none" if tool_choice == "auto" and not auto else tool_choice


def add_item(messages: list[dict], item: FunctionCallItem | FunctionCallOutputItem, index: int) -> None:
    """Append ``input[index]``, a tool item, to the chat ``messages`` (vLLM's
    ``_construct_message_from_response_item``): a call joins the assistant message before it, else
    opens one; an output is a tool message.

    Raises:
        ParamError: a call's ``arguments`` that are not JSON or nest past the parser (the chat
            template gets them parsed).
    """
    if isinstance(item, FunctionCallOutputItem):
        messages.append({"role": "tool", "content": item.output, "tool_call_id": item.call_id})
        return
    try:
        json.loads(item.arguments)
    except ValueError:
        raise ParamError(f"input[{index}].arguments is not JSON: {item.arguments[:80]!r}", "input") from None
    except RecursionError:  # nested past the parser: was a 500
        raise ParamError(f"input[{index}].arguments is nested too deeply to parse", "input") from None
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "tool_calls": [call]})


def add_assistant_text(messages: list[dict], text: str) -> None:
    """Append an assistant message's ``text``: the content of a call-only assistant message
    right before it (vLLM's rule), else a message of its own."""
    if messages and messages[-1]["role"] == "assistant" and messages[-1].get("content") is None:
        messages[-1]["content"] = text
    else:
        messages.append({"role": "assistant", "content": text})
