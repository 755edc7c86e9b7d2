"""Response objects with vLLM 0.32's keys and values, chunk by chunk and whole: our Shaper and SSE
events on hand-made engine outputs against vLLM's own serving classes' answers to the same outputs,
recorded by tests/http/vllm_shapes.py (run in the vLLM venv) in tests/data/vllm_shapes.json. No
server: the front end's response path alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.echo import Echo
from nlora_serve.serving.http_api.openai_route import _events, shaper_of
from nlora_serve.serving.http_api.openai import chat_params, completion_inputs
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
from nlora_serve.serving.server_config import ServerConfig


# vLLM 0.32's own answers to hand-made engine outputs, recorded by tests/http/vllm_shapes.py (its
# serving classes run in the vLLM venv on vLLM RequestOutputs built from each case)
VLLM_SHAPES = json.loads((Path(__file__).parents[1] / "data" / "vllm_shapes.json").read_text())["cases"]


def _without_ours(body):
    """A response object less what is deliberately ours: ``created`` (a clock), the
    ``system_fingerprint`` (the adapter version; vLLM's names the server) and usage's
    prompt_tokens_details (our cached_tokens is vLLM's with --enable-prompt-tokens-details)."""
    if isinstance(body, str):
        return body
    body = {key: value for key, value in body.items() if key not in ("created", "system_fingerprint")}
    if isinstance(body.get("usage"), dict):
        body["usage"] = {key: value for key, value in body["usage"].items() if key != "prompt_tokens_details"}
    return body


def _our_response(case: dict, tokenizer) -> list | dict:
    """The HTTP front end's answer to a vllm_shapes.py case: its Shaper (built as generate.py builds
    it) on the case's deltas as the engine yields them, streamed through generate.py's SSE events."""
    chat = case["kind"] == "chat"
    data = {"model": "m", **case["request"],
            **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": case["prompt_text"]})}
    body = validated(ChatRequest if chat else CompletionRequest, data)
    params = chat_params(body, ServerConfig()) if chat else completion_inputs(body, ServerConfig())[1]
    echo = [Echo(case["prompt_text"], body.max_tokens == 0)] if getattr(body, "echo", False) else None
    shaper = shaper_of("chatcmpl-1" if chat else "cmpl-1", body, params, tokenizer, [case["prompt_ids"]], echo)
    scored = [None if e is None else PromptLogprob({int(t): lp for t, (lp, _) in e.items()}, next(iter(e.values()))[1])
              for e in case.get("prompt_logprobs") or []]
    outs, made = [], {}
    for delta in (d for step in case["steps"] for d in step):
        index = delta["index"]
        made[index] = made.get(index, 0) + len(delta["token_ids"])
        outs.append(RequestOutput("r", delta["text"], delta["token_ids"], delta.get("finish_reason"),
                                  len(case["prompt_ids"]), made[index],
                                  [{int(t): lp for t, (lp, _) in e.items()} for e in delta["logprobs"]]
                                  if delta.get("logprobs") else None,
                                  prompt_logprobs=scored or None if made[index] == len(delta["token_ids"]) else None,
                                  index=index))
    if not body.stream:
        return shaper.whole(outs)

    async def sse() -> list[str]:
        async def rest():
            for out in outs[1:]:
                yield out
        return [event async for event in _events(outs[0], rest(), shaper)]

    data = [event.removeprefix("data: ").strip() for event in asyncio.run(sse())]
    return [json.loads(d) if d != "[DONE]" else d for d in data]


@pytest.mark.parametrize("name", list(VLLM_SHAPES))
def test_responses_have_vllms_shapes(tokenizer, name):
    """Chunk by chunk (or whole), the same keys and values as vLLM 0.32's: a chat stream's content
    deltas {"content": ""} where a token adds no text, stop_reason on its finishing chunks only,
    token_ids and prompt_token_ids null where not asked; a whole response's vLLM-only fields null;
    echo's logprobs cut from the prompt scored to prompt_logprobs, which comes back with echo."""
    recorded = VLLM_SHAPES[name]
    ours = _our_response(recorded["case"], tokenizer)
    want = recorded["vllm"]
    if isinstance(want, list):
        assert [_without_ours(c) for c in ours] == [_without_ours(c) for c in want]
    else:
        assert _without_ours(ours) == _without_ours(want)


# vLLM 0.32's answers where byte-level tokens split characters (its engine's logprob token strings),
# recorded by tests/http/vllm_live.py from a vLLM server on the default model
SPLIT = json.loads((Path(__file__).parents[1] / "data" / "vllm_live.json").read_text())["cases"]


def _logprob_fields(body: dict) -> dict:
    """A whole response's logprobs and prompt_logprobs; chat entries without ``bytes`` (ours are the
    token's own bytes, OpenAI's rule; vLLM's the UTF-8 of its string, none for an incomplete character)."""
    choice = body["choices"][0]
    if "message" not in choice:
        return {"logprobs": choice["logprobs"], "prompt_logprobs": choice["prompt_logprobs"]}
    strip = lambda e: {k: v for k, v in e.items() if k != "bytes"}  # noqa: E731
    return {"content": [{**strip(e), "top_logprobs": [strip(t) for t in e["top_logprobs"]]}
                        for e in choice["logprobs"]["content"]]}


@pytest.mark.parametrize("name", list(SPLIT))
def test_split_characters_logprobs_as_vllms(tokenizer, name):
    """A token that ends inside a multi-byte character is "" and the one completing it the whole
    character (decoded after up to 4 tokens before it, generated or prompt), as vLLM 0.32's tokens,
    top_logprobs keys and prompt_logprobs' decoded_token; text_offset then indexes the text. Was each
    token's own decoding, U+FFFD, with offsets past the text's end."""
    recorded = SPLIT[name]
    assert _logprob_fields(_our_response(recorded["case"], tokenizer)) == _logprob_fields(recorded["vllm"])
