"""Tool calls and token masks against vLLM 0.32 itself: our "required" stream deltas equal vLLM's
``extract_required_tool_call_streaming`` for every split of several outputs, our forced schemas
equal ``get_json_schema_from_tools``, our refusals vLLM's request validation words, our bad-word
tokenization ``SamplingParams.update_from_tokenizer``'s; and over ``serve --backend vllm`` (vLLM's
sampler) greedy answers with ``allowed_token_ids`` / ``bad_words`` equal our engine's (the main
venv's tests/http/test_http_token_masks.py checks ours against transformers). Runs only where vllm
is importable (see conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from grpc_harness import TENANT_KEYS, RunningServer
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.sample.token_masks import bad_words_token_ids
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.http_api.tool_stream import RequiredStream
from nlora_serve.serving.http_api.tools import Tool, tool_calls_of
from nlora_serve.serving.server_config import ServerConfig

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BARE = {"type": "function", "function": {"name": "ping"}}
OUTPUTS = ['[{"name": "get_weather", "parameters": {"city": "Pa\\"ris", "x": [1, {"y": "]"}]}}, '
           '{"name": "ping", "parameters": {}}]',
           '[\n  {"parameters": {"city": "Rome"}, "name": "get_weather"}\n]',
           '[{"name":"ping","parameters":{ }},{"name":"get_weather","parameters":{"city":"Oslo"}}]']


def _vllm_deltas(pieces: list[str]) -> list[list[dict]]:
    from vllm.tool_parsers.streaming import extract_required_tool_call_streaming

    out, text = [], ""
    for piece in pieces:
        delta, _ = extract_required_tool_call_streaming(previous_text=text, current_text=text + piece,
                                                        tool_call_idx=None, tool_call_id_type="random")
        text += piece
        out.append([] if delta is None else [_plain(c.model_dump(exclude_none=True)) for c in delta.tool_calls])
    return out


def _plain(call: dict) -> dict:
    call.pop("id", None)
    return call


def _splits(text: str):
    yield list(text)  # one character per delta
    for a, b in itertools.combinations(range(1, len(text), 7), 2):
        yield [text[:a], text[a:b], text[b:]]


@pytest.mark.parametrize("text", OUTPUTS)
def test_required_stream_deltas_equal_vllms(text):
    for pieces in _splits(text):
        ours = RequiredStream()
        got = [[_plain(c) for c in ours.delta(p).get("tool_calls", [])] for p in pieces]
        assert got == _vllm_deltas(pieces), pieces


@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False),
                                               ({"type": "function", "function": {"name": "ping"}}, True),
                                               ({"type": "function", "function": {"name": "get_weather"}}, True)])
def test_forced_schemas_equal_vllms(choice, parallel):
    from vllm.entrypoints.openai.chat_completion.protocol import (ChatCompletionNamedToolChoiceParam,
                                                                  ChatCompletionToolsParam)
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    tools = [WEATHER, BARE]
    _, ours = tool_calls_of([Tool.model_validate(t) for t in tools], choice, True, parallel)
    vllm_choice = choice if isinstance(choice, str) else ChatCompletionNamedToolChoiceParam.model_validate(choice)
    theirs = get_json_schema_from_tools(vllm_choice, [ChatCompletionToolsParam.model_validate(t) for t in tools],
                                        parallel)
    assert ours == theirs


@pytest.mark.parametrize("fields", [{"tools": []}, {"tool_choice": "required"},
                                    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                                    {"tools": [WEATHER], "tool_choice": "sometimes"}])
def test_refusals_are_vllms_words(fields):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    with pytest.raises(Exception) as theirs:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})
    with pytest.raises(Exception) as ours:
        tools = fields.get("tools")
        tool_calls_of(None if tools is None else [Tool.model_validate(t) for t in tools], fields.get("tool_choice"),
                      "tool_choice" in fields, True)
    assert str(ours.value) in str(theirs.value)


def test_bad_words_tokenize_as_vllm(base_fp32):
    from vllm.sampling_params import SamplingParams

    tok = base_fp32.tokenizer()
    words = ["Paris", " the capital", "unbelievable", "é"]
    theirs = SamplingParams(bad_words=words)

    class VllmTokenizer:  # the two members vLLM's tokenizer wrapper gives update_from_tokenizer
        encode, max_token_id = tok.encode, len(tok) - 1

    theirs.update_from_tokenizer(VllmTokenizer())
    assert [list(s) for s in bad_words_token_ids(tok, tuple(words))] == theirs.bad_words_token_ids


@pytest.fixture(scope="module")
def servers(base_fp32, tenants_file):
    """(vLLM-backed server, our engine's server), HTTP on."""
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    config = EngineConfig(dtype=torch.float32,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512))
    out = []
    for backend, engine in (("vllm", VllmEngine(config, None, base_fp32)), ("nlora", LLMEngine(config, base_fp32))):
        serve_config = ServerConfig(port=0, http_port=0, tenants_file=str(tenants_file))
        out.append(RunningServer(engine, serve_config, Authenticator.from_file(tenants_file),
                                 server_info(base_fp32, config, serve_config, backend=backend), base_fp32.tokenizer()))
    yield out
    for running in out:
        running.stop()
        running.engine.shutdown()


def _greedy(server, prompt: list[int], **extra) -> list[int]:
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=TENANT_KEYS["base-co"],
                        max_retries=0, timeout=300)
    reply = api.completions.create(model=server.server.generation.info.model, prompt=prompt, max_tokens=10,
                                   temperature=0, logprobs=0,
                                   extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra})
    return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]


def test_masked_greedy_equals_vllms(servers, base_fp32):
    vllm_server, ours = servers
    prompt = base_fp32.tokenizer().encode("The capital of France is")
    free = _greedy(ours, prompt)
    words = base_fp32.tokenizer().decode(free).split()[:2]
    allowed = sorted(set(free[2:]) | set(range(200, 4000, 97)))
    for extra in ({"allowed_token_ids": allowed}, {"bad_words": words}):
        theirs = _greedy(vllm_server, prompt, **extra)
        assert _greedy(ours, prompt, **extra) == theirs != free, extra
