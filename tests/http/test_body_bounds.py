"""Counts no request can serve (chat messages past max_model_len, a completion batch past 1,024
prompts or --max-queue, /detokenize ids past max_model_len) are refused on the parsed body, before
it is validated into its request model: the validation of such a body held the GIL, so every
tenant's streams, for up to seconds (bench/loop_lag.py). Structural: the route's ``validated`` is
replaced by a spy, which a refused body never reaches; the messages are the ones the requests got
after validation (hand-written here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nlora_serve.serving.http_api import openai_route, tokenize
from nlora_serve.serving.http_api.request_models import ParamError

MAX_MODEL_LEN, MAX_QUEUE = 8, 300
CTX = SimpleNamespace(engine=SimpleNamespace(max_model_len=MAX_MODEL_LEN), config=SimpleNamespace(max_queue=MAX_QUEUE))
MESSAGE = {"role": "user", "content": "a"}


class Validated(Exception):
    """What the spy raises: the body reached the validation."""


@pytest.fixture
def spy(monkeypatch):
    def validated(kind, data):
        raise Validated(kind.__name__)
    monkeypatch.setattr(openai_route, "validated", validated)
    monkeypatch.setattr(tokenize, "validated", validated)


def _chat(data):
    return openai_route._read_openai(data, CTX, chat=True)


def _completion(data):
    return openai_route._read_openai(data, CTX, chat=False)


def _tokenize(data):
    return tokenize._tokenize_work(CTX, data)


def _detokenize(data):
    return tokenize._detokenize_work(CTX, data)


MESSAGES = ("messages holds 9 messages: more turns than the model's context holds tokens (max_model_len 8; "
            "refused before rendering)")
REFUSED = [
    (_chat, {"model": "m", "messages": [MESSAGE] * 9}, "messages", MESSAGES),
    (_tokenize, {"model": "m", "messages": [MESSAGE] * 9}, "messages", MESSAGES),
    (_completion, {"model": "m", "prompt": ["ab"] * 1025}, "prompt",
     "prompt list length 1025 exceeds the maximum allowed count of 1024 (vLLM's VLLM_MAX_COMPLETION_PROMPTS default)"),
    (_completion, {"model": "m", "prompt": [[1, 2]] * 1025, "n": 2}, "prompt",
     "prompt list length 1025 exceeds the maximum allowed count of 1024"),
    (_completion, {"model": "m", "prompt": [[1, 2]] * 301}, "prompt",
     "prompt holds 301 prompts x n=1 choices = 301 requests: more than the server's --max-queue 300 (each is a "
     "request running or waiting)"),
    (_completion, {"model": "m", "prompt": ["ab"] * 151, "n": 2}, "prompt",
     "prompt holds 151 prompts x n=2 choices = 302 requests: more than the server's --max-queue 300"),
    (_detokenize, {"model": "m", "tokens": [100] * 9}, "tokens",
     "tokens holds 9 ids: more than the model's context holds (max_model_len 8)"),
    (_completion, {"model": "m", "prompt": "a", "stop": ["ab"] * 65}, "stop",
     "stop must be at most 64 strings; got ('ab', 'ab',"),
    (_chat, {"model": "m", "messages": [MESSAGE], "stop_token_ids": [7] * 1025}, "stop_token_ids",
     "stop_token_ids must be at most 1024 token ids; got (7, 7, "),
    (_chat, {"model": "m", "messages": [MESSAGE], "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias",
     "logit_bias must be at most 1024 entries; got (('0', 1), ('1', 1), "),
    (_completion, {"model": "m", "prompt": "a", "logprob_token_ids": [1] * 129}, "logprob_token_ids",
     "logprob_token_ids must be at most 128 token ids (null or an empty list: none, as vLLM); got (1, 1, "),
    (_completion, {"model": "m", "prompt": "a", "allowed_token_ids": [1] * ((1 << 20) + 1)}, "allowed_token_ids",
     "allowed_token_ids must be None or 1 to 1048576 token ids (vLLM refuses an empty list); got (1, 1, "),
    (_chat, {"model": "m", "messages": [MESSAGE], "bad_words": ["w"] * 129}, "bad_words",
     f"bad_words must be at most 128 words; got {repr(('w',) * 129)[:200]}... ({len(repr(('w',) * 129))} characters)"),
]


@pytest.mark.parametrize("read, data, param, message", REFUSED)
def test_a_count_no_request_can_serve_is_refused_before_validation(spy, read, data, param, message):
    with pytest.raises(ParamError) as refused:
        read(data)
    assert message in str(refused.value) and refused.value.param == param


@pytest.mark.parametrize("read, data", [
    (_chat, {"model": "m", "messages": [MESSAGE] * 8}),  # at the bound
    (_tokenize, {"model": "m", "messages": [MESSAGE] * 8}),
    (_completion, {"model": "m", "prompt": list(range(5000))}),  # one prompt of ids: truncate_prompt_tokens may cut it
    (_completion, {"model": "m", "prompt": ["ab"] * 300}),
    (_completion, {"model": "m", "prompt": ["ab"] * 200, "n": 301}),  # n's own check refuses it, after validation
    (_completion, {"model": "m", "prompt": ["ab"] * 200, "n": "2"}),
    (_completion, {"model": "m", "prompt": [True] * 2000}),  # no batch: the validation names what is wrong
    (_chat, {"model": "m", "messages": "hi"}),
    (_detokenize, {"model": "m", "tokens": [100] * 8}),
    (_completion, {"model": "m", "prompt": "a", "stop": ["ab"] * 64, "logit_bias": {"1": 1}, "bad_words": "w" * 500}),
    (_detokenize, ["tokens"]),
])
def test_what_could_be_served_or_is_no_such_count_is_validated_as_before(spy, read, data):
    with pytest.raises(Validated):
        read(data)


@pytest.mark.parametrize("value", [("ab",) * 300_000, tuple(range(5000)), tuple((i, 1.5) for i in range(3000)),
                                   ["x"] * 1000, ("a",) * 256, ("a",) * 257, ("a" * 300,), (), "s" * 300, 5,
                                   {str(i): 1.5 for i in range(3000)}, {"a": 1}, {str(i): 1 for i in range(256)}])
def test_a_long_value_is_shown_as_its_repr_cut(value):
    from nlora_serve.engine.sample.sampling import shown_value

    whole = repr(tuple(value.items()) if isinstance(value, dict) else value)  # the reference: _check's repr of it all
    assert shown_value(value) == (f"{whole[:200]}... ({len(whole)} characters)" if len(whole) > 200 else whole)


@pytest.mark.parametrize("chat", [False, True])
def test_an_empty_logprob_token_ids_is_unset_as_in_vllm(chat):
    """vLLM 0.32 takes ``logprob_token_ids: []`` as unset (its protocol's checks test the list's truth,
    its ``to_sampling_params`` passes ``logprob_token_ids or None``): the top-k logprobs as without it,
    and the refusal of a long list says so rather than "1 to 128"."""
    from nlora_serve.serving.http_api.body import validated
    from nlora_serve.serving.http_api.openai import chat_params, completion_inputs
    from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
    from nlora_serve.serving.server_config import ServerConfig
    if chat:
        body = validated(ChatRequest, {"model": "m", "messages": [MESSAGE], "logprobs": True, "top_logprobs": 2,
                                       "logprob_token_ids": []})
        params = chat_params(body, ServerConfig())
    else:
        body = validated(CompletionRequest, {"model": "m", "prompt": "a", "logprobs": 2, "logprob_token_ids": []})
        params = completion_inputs(body, ServerConfig())[1]
    assert (params.logprob_token_ids, params.logprobs) == (None, 2)
