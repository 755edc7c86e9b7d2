"""Records vLLM 0.32's own /v1/responses objects for hand-made engine outputs, the reference of
tests/http/test_http_responses_shapes.py: each case's SSE events or whole response as vLLM's
OpenAIServingResponses.responses_stream_generator / responses_full_generator write them (its
SimpleContext, no reasoning parser, no response store: ``vllm serve``'s defaults; the tool cases
with ``--enable-auto-tool-choice --tool-call-parser pythonic``, a parser that serves "required" and
named tool choices from their forced JSON as every such parser does), run on
vLLM RequestOutputs built from the case (no engine, no model), written to
tests/data/vllm_responses_shapes.json. Run it in the vLLM venv after changing CASES or vLLM:

    .venv-vllm/bin/python tests/http/vllm_responses_shapes.py

A case: ``request`` (body fields besides model and input), ``max_tokens`` (the effective limit vLLM
would compute), ``prompt_ids``, ``cached`` (prompt tokens from the prefix cache), ``steps`` (engine
deltas ``{text, token_ids, finish_reason, logprobs}``: per token its ``[[id, logprob], ...]``, the
sampled token first then the others best first, each id's text :data:`VOCAB`'s).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

OUT = Path(__file__).parents[1] / "data" / "vllm_responses_shapes.json"
P = [1, 504, 3, 8]
TWO = [{"text": "Hi", "token_ids": [5]}, {"text": " there", "token_ids": [6]},
       {"text": "", "token_ids": [2], "finish_reason": "stop"}]
CUT = [{"text": "Hi", "token_ids": [5]}, {"text": " x", "token_ids": [6], "finish_reason": "length"}]
EMPTY = [{"text": "", "token_ids": [2], "finish_reason": "stop"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather", "parameters": SCHEMA},
         {"type": "function", "name": "get_time", "parameters": {"type": "object"}, "strict": True}]
VOCAB = {5: "Hi", 6: " there", 9: "Yo", 10: " here", 11: "!", 2: ""}
SCORED = [{"text": "Hi", "token_ids": [5], "logprobs": [[[5, -0.25], [9, -1.5], [11, -3.0]]]},
          {"text": " there", "token_ids": [6], "logprobs": [[[6, -0.5], [10, -1.0], [11, -4.0]]]},
          {"text": "", "token_ids": [2], "finish_reason": "stop", "logprobs": [[[2, -0.125], [11, -2.5], [9, -5.0]]]}]
LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "temperature": 0.0}
NAMED = {"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}
ARGS = [{"text": '{"a"', "token_ids": [5]}, {"text": ": 1", "token_ids": [6]}, {"text": "}", "token_ids": [7]},
        {"text": "", "token_ids": [2], "finish_reason": "stop"}]
CALLS = [{"text": '[{"name": "get_weather", ', "token_ids": [5]}, {"text": '"parameters": {"a": 1', "token_ids": [6]},
         {"text": '}}, {"name": "get_time", "parameters": {}}', "token_ids": [7]}, {"text": "]", "token_ids": [8]},
         {"text": "", "token_ids": [2], "finish_reason": "stop"}]

CASES = {
    "whole": {"request": {}, "max_tokens": 100, "steps": TWO},
    "whole cut": {"request": {"max_output_tokens": 2, "temperature": 0.0, "instructions": "Be brief.",
                              "metadata": {"k": "v"}, "user": "u1"}, "max_tokens": 2, "steps": CUT, "cached": 2},
    "whole empty": {"request": {"text": {"format": {"type": "text"}}}, "max_tokens": 100, "steps": EMPTY},
    "whole json_schema": {"request": {"text": {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA,
                                                          "strict": True}},
                                      "reasoning": {"effort": "low"}, "top_p": 0.5, "store": False},
                          "max_tokens": 100, "steps": TWO},
    "stream": {"request": {"stream": True}, "max_tokens": 100, "steps": TWO},
    "stream cut": {"request": {"stream": True, "max_output_tokens": 2, "text": {"format": {"type": "json_object"}}},
                   "max_tokens": 2, "steps": CUT},
    "stream empty": {"request": {"stream": True}, "max_tokens": 100, "steps": EMPTY},
    "whole named": {"request": NAMED, "max_tokens": 100, "steps": ARGS, "parser": True},
    "whole required": {"request": {"tools": TOOLS, "tool_choice": "required"}, "max_tokens": 100, "steps": CALLS,
                       "parser": True},
    "whole one required": {"request": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
                           "max_tokens": 100, "steps": CALLS, "parser": True},
    "stream named": {"request": {**NAMED, "stream": True}, "max_tokens": 100, "steps": ARGS, "parser": True},
    "stream required": {"request": {"tools": TOOLS, "tool_choice": "required", "stream": True}, "max_tokens": 100,
                        "steps": CALLS, "parser": True},
    "whole auto": {"request": {"tools": TOOLS}, "max_tokens": 100, "steps": TWO},
    "whole logprobs": {"request": LOGPROBS, "max_tokens": 100, "steps": SCORED},
    "stream logprobs": {"request": {**LOGPROBS, "stream": True}, "max_tokens": 100, "steps": SCORED},
}


def _outputs(case: dict, cumulative: bool):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    text, ids, scored = "", [], []
    for step in case["steps"]:
        step_scored = [{i: Logprob(lp, rank, VOCAB[i]) for rank, (i, lp) in enumerate(entries, 1)}
                       for entries in step.get("logprobs", [])]
        text, ids = (text + step["text"], ids + step["token_ids"]) if cumulative else (step["text"], step["token_ids"])
        scored = scored + step_scored if cumulative else step_scored
        out = CompletionOutput(index=0, text=text, token_ids=list(ids), cumulative_logprob=None,
                               logprobs=list(scored) if "logprobs" in step else None,
                               finish_reason=step.get("finish_reason"), stop_reason=None)
        yield RequestOutput(request_id="r", prompt="p", prompt_token_ids=case.get("prompt_ids", P), prompt_logprobs=None,
                            outputs=[out], finished=out.finish_reason is not None,
                            num_cached_tokens=case.get("cached", 0))


def _serving(parser: bool = False):
    """vLLM's OpenAIServingResponses with the attributes its generators read, as ``vllm serve`` sets
    them by default (no harmony model, no parsers, no store, no per-request metrics); ``parser``:
    with ``--enable-auto-tool-choice --tool-call-parser pythonic``."""
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
    from vllm.parser.parser_manager import ParserManager

    serving = object.__new__(OpenAIServingResponses)
    for name, value in {"use_harmony": False, "enable_store": False, "enable_log_outputs": False,
                        "request_logger": None, "enable_per_request_metrics": False, "tool_server": None,
                        "return_tokens_as_token_ids": False, "enable_auto_tools": parser, "response_store": {},
                        "msg_store": {}, "parser": None}.items():
        setattr(serving, name, value)
    if parser:
        serving.parser = ParserManager.get_parser(tool_parser_name="pythonic", enable_auto_tools=True)
    return serving


def vllm_response(case: dict) -> list | dict:
    """vLLM's answer to ``case``: its SSE events' (type, JSON), or its whole response's JSON."""
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
    from vllm.entrypoints.openai.responses.context import SimpleContext
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    request = ResponsesRequest(model="m", input="hi", **case["request"])
    request.store = False  # _create_responses' step without a store: store=true is ignored
    params = request.to_sampling_params(case["max_tokens"], {})
    serving = _serving(case.get("parser", False))
    # the parser's own tokenizer is not read by a JSON parse of forced calls
    context = SimpleContext(response_parser=serving.parser(None, request.tools) if serving.parser else None)
    meta = RequestResponseMetadata(request_id=request.request_id)

    async def generator():
        for out in _outputs(case, cumulative=False):
            context.append_output(out)
            yield context

    if not request.stream:
        whole = asyncio.run(serving.responses_full_generator(request, params, generator(), context, "m", None, meta))
        return whole.model_dump(mode="json", by_alias=True)

    async def collect():
        return [(event.type, json.loads(event.model_dump_json(indent=None, by_alias=True))) async for event in
                serving.responses_stream_generator(request, params, generator(), context, "m", None, meta)]

    return asyncio.run(collect())


def main() -> None:
    logging.disable(logging.CRITICAL)
    import vllm

    recorded = {"vllm": vllm.__version__, "vocab": VOCAB,
                "cases": {name: {"case": case, "vllm": vllm_response(case)} for name, case in CASES.items()}}
    OUT.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"wrote {OUT} ({len(CASES)} cases, vLLM {vllm.__version__})")


if __name__ == "__main__":
    main()
