"""Records vLLM 0.32's own response objects for hand-made engine outputs, the reference of
tests/http/test_http_vllm_shapes.py's ``test_responses_have_vllms_shapes``: each case's chunks (SSE) or
whole response as vLLM's OpenAIServingChat.chat_completion_stream_generator /
chat_completion_full_generator and OpenAIServingCompletion.completion_stream_generator /
request_output_to_completion_response write them, run on vLLM RequestOutputs built from the case
(no engine, no model: the serving objects get the attributes those methods read, as a default
``vllm serve`` sets them but for ``--fingerprint-mode none``: the test leaves the fingerprint out,
ours being the adapter version), written to tests/data/vllm_shapes.json. Run it in the vLLM venv after
changing CASES or vLLM:

    .venv-vllm/bin/python tests/http/vllm_shapes.py

A case: ``kind`` ("chat" | "completion"), ``request`` (body fields besides model, messages and
prompt), ``prompt_ids``, ``prompt_text`` (completions: the prompt as sent), ``prompt_logprobs``
(per prompt token null or ``{id: [logprob, rank]}``, the token first, then its top K, as vLLM's
engine builds them), ``steps`` (engine iterations, each a list of deltas ``{index, text, token_ids,
finish_reason, logprobs: [{id: [logprob, rank]}]}``: the sampled token first, then its top N).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

OUT = Path(__file__).parents[1] / "data" / "vllm_shapes.json"
MODEL = "SmolLM2-135M-Instruct"  # the tests' default model: its tokenizer decodes the logprob tokens

P = [1, 504, 3, 8]  # <|im_start|> The <repo_name> <issue_start>


def _entry(token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> dict:
    """vLLM's {id: Logprob} of one position: the position's token first, then ``top`` (ranks 1..)."""
    entry = {str(token): [logprob, rank]}
    for r, (t, lp) in enumerate(top, start=1):
        entry.setdefault(str(t), [lp, r])
    return entry


def _prompt_entries(k: int) -> list[dict | None]:
    """P's prompt logprobs scored to top ``k``: tokens 504 (rank 2), 3 (rank 1), 8 (rank 40)."""
    return [None, _entry(504, -1.0, 2, [(9, -0.5), (504, -1.0), (10, -2.0), (11, -3.0)][:k]),
            _entry(3, -0.1, 1, [(3, -0.1), (7, -3.0), (8, -4.0), (12, -5.0)][:k]),
            _entry(8, -7.0, 40, [(13, -0.2), (14, -2.5), (15, -2.7), (16, -5.0)][:k])]


def _sampled(n: int) -> list[dict]:
    return [_entry(88, -0.2, 1, [(88, -0.2), (5, -2.0), (6, -3.0), (17, -4.0)][:n])]


TWO = [[{"index": 0, "text": "Hi", "token_ids": [5]}],  # then an EOS: no text
       [{"index": 0, "text": "", "token_ids": [2], "finish_reason": "stop"}]]
N2 = [[{"index": 0, "text": "Hi", "token_ids": [5]},
       {"index": 1, "text": "", "token_ids": [2], "finish_reason": "stop"}],
      [{"index": 0, "text": " x", "token_ids": [6], "finish_reason": "length"}]]
LOGPROBS = [[{"index": 0, "text": "x", "token_ids": [88], "logprobs": _sampled(1)}],
            [{"index": 0, "text": "", "token_ids": [2], "finish_reason": "stop",
              "logprobs": [_entry(2, -0.3, 1, [(2, -0.3)])]}]]
ECHOED = [[{"index": 0, "text": "x", "token_ids": [88], "finish_reason": "length", "logprobs": _sampled(2)}]]


def _echo(n: int, k: int | None, **request) -> dict:
    body = {"echo": True, "logprobs": n, "max_tokens": 1, **request}
    if k is not None:
        body["prompt_logprobs"] = k
    return {"kind": "completion", "request": body, "prompt_ids": P, "prompt_text": "abcd",
            "prompt_logprobs": _prompt_entries(n if k is None else k),
            "steps": [[{**ECHOED[0][0], "logprobs": _sampled(n)}]]}


def _chat(steps, **request) -> dict:
    return {"kind": "chat", "request": request, "prompt_ids": P, "steps": steps}


def _completion(steps, **request) -> dict:
    return {"kind": "completion", "request": request, "prompt_ids": P, "prompt_text": "abcd", "steps": steps}


CASES = {
    "chat stream": _chat(TWO, stream=True),
    "chat stream n=2 include_usage": _chat(N2, stream=True, n=2, stream_options={"include_usage": True}),
    "chat stream continuous_usage_stats": _chat(TWO, stream=True, stream_options={"include_usage": True,
                                                                                  "continuous_usage_stats": True}),
    "chat stream logprobs return_token_ids": _chat(LOGPROBS, stream=True, logprobs=True, top_logprobs=1,
                                                   return_token_ids=True),
    "chat whole": _chat(TWO),
    "chat whole n=2 logprobs": _chat([[{**LOGPROBS[0][0]}, {**LOGPROBS[1][0], "index": 1}],
                                      [{**LOGPROBS[1][0]}]], n=2, logprobs=True, top_logprobs=1),
    "completion stream": _completion(TWO, stream=True),
    "completion stream n=2 return_token_ids": _completion(N2, stream=True, n=2, return_token_ids=True),
    "completion stream echo": _completion(TWO, stream=True, echo=True),
    "completion whole": _completion(TWO),
    "completion whole return_token_ids": _completion(TWO, return_token_ids=True),
    "echo logprobs 2": _echo(2, None),
    "echo logprobs 2 streamed": _echo(2, None, stream=True),
    "echo logprobs 1 prompt_logprobs 3": _echo(1, 3),
    "echo logprobs 3 prompt_logprobs 1": _echo(3, 1),
    "echo logprobs 2 max_tokens 0": _echo(2, None, max_tokens=0),
}


def _vllm_outputs(case: dict, tokenizer, cumulative: bool):
    """The engine's RequestOutputs of ``case``: per step its deltas, or with ``cumulative`` (vLLM's
    whole responses read the last) each choice's outputs so far."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

    def logprobs(entry):
        ids = [int(t) for t in entry]
        return {t: Logprob(lp, rank, text) for t, (lp, rank), text
                in zip(ids, entry.values(), convert_ids_list_to_tokens(tokenizer, ids))}

    scored = case.get("prompt_logprobs")
    scored = None if scored is None else [None if e is None else logprobs(e) for e in scored]
    so_far: dict[int, dict] = {}  # cumulative: per choice its outputs so far
    for step_index, step in enumerate(case["steps"]):
        shown = []
        for delta in step:
            delta = {**delta, "logprobs": None if delta.get("logprobs") is None
                     else [logprobs(e) for e in delta["logprobs"]]}
            before = so_far.get(delta["index"])
            if cumulative and before is not None:
                delta = {**delta, "text": before["text"] + delta["text"],
                         "token_ids": before["token_ids"] + delta["token_ids"],
                         "logprobs": None if delta["logprobs"] is None else before["logprobs"] + delta["logprobs"]}
            so_far[delta["index"]] = delta
            shown.append(delta)
        if cumulative:
            shown = sorted(so_far.values(), key=lambda d: d["index"])
        outputs = [CompletionOutput(index=d["index"], text=d["text"], token_ids=d["token_ids"], cumulative_logprob=None,
                                    logprobs=d["logprobs"], finish_reason=d.get("finish_reason"), stop_reason=None)
                   for d in shown]
        yield RequestOutput(request_id="r", prompt=case.get("prompt_text"), prompt_token_ids=case["prompt_ids"],
                            prompt_logprobs=scored if cumulative or step_index == 0 else None, outputs=outputs,
                            finished=all(o.finish_reason for o in outputs), num_cached_tokens=0)


def _serving(cls):
    """vLLM's serving object with the attributes its generators read, as ``vllm serve`` sets them
    by default (no tool or reasoning parser, no forced usage), but no fingerprint (vLLM's default
    ``--fingerprint-mode full`` sends ``vllm-<version>-<hash8>``; the test compares without it)."""
    serving = object.__new__(cls)
    for name, value in {"parser_cls": None, "enable_force_include_usage": False, "enable_log_outputs": False,
                        "request_logger": None, "system_fingerprint": None, "_include_reasoning_tokens_details": False,
                        "enable_prompt_tokens_details": False, "enable_per_request_metrics": False,
                        "response_role": "assistant", "return_tokens_as_token_ids": False,
                        "enable_auto_tools": False}.items():
        setattr(serving, name, value)
    return serving


def vllm_response(case: dict, tokenizer) -> list | dict:
    """vLLM's answer to ``case``: its SSE messages' JSON (``"[DONE]"`` last), or its whole response."""
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    request, meta = case["request"], RequestResponseMetadata(request_id="r")

    async def each(outputs, indexed=False):
        for out in outputs:
            yield (0, out) if indexed else out

    async def collect(gen):
        return [message async for message in gen]

    if case["kind"] == "chat":
        serving = _serving(OpenAIServingChat)
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **request)
        if body.stream:
            sse = asyncio.run(collect(serving.chat_completion_stream_generator(
                body, each(_vllm_outputs(case, tokenizer, False)), "chatcmpl-1", "m", [], tokenizer, meta)))
        else:
            return asyncio.run(serving.chat_completion_full_generator(
                body, each(_vllm_outputs(case, tokenizer, True)), "chatcmpl-1", "m", [], tokenizer, meta)).model_dump()
    else:
        serving = _serving(OpenAIServingCompletion)
        body = CompletionRequest(model="m", prompt=case["prompt_text"], **request)
        if not body.stream:
            final = list(_vllm_outputs(case, tokenizer, True))[-1]
            return serving.request_output_to_completion_response([final], body, "cmpl-1", 1, "m", tokenizer,
                                                                 meta).model_dump()
        sse = asyncio.run(collect(serving.completion_stream_generator(
            body, [None], each(_vllm_outputs(case, tokenizer, False), True), "cmpl-1", 1, "m", 1, tokenizer, meta)))
    data = [message.removeprefix("data: ").strip() for message in sse]
    return [json.loads(d) if d != "[DONE]" else d for d in data]


def main() -> None:
    logging.disable(logging.CRITICAL)
    from transformers import AutoTokenizer

    from nlora_serve.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    import vllm

    recorded = {"vllm": vllm.__version__, "model": MODEL,
                "cases": {name: {"case": case, "vllm": vllm_response(case, tokenizer)} for name, case in CASES.items()}}
    OUT.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"wrote {OUT} ({len(CASES)} cases, vLLM {vllm.__version__})")


if __name__ == "__main__":
    main()
