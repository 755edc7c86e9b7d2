"""Structured outputs over HTTP, as a vLLM 0.32 user sends them (http_api/structured.py): OpenAI's
``response_format`` json_object / json_schema and vLLM's ``structured_outputs`` (json, regex,
choice) on chat and completions, streamed and not, on the base model and a LoRA tenant. Every
answer is checked by json.loads and a hand check of the schema, re.fullmatch, membership; bad specs
are a 400 naming the field before anything queues."""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import TENANTS, client
from nlora_serve.engine.structured_output import grammar_compiler

LORA = "lora-rslora"  # granted to lora-co
assert TENANTS[LORA] == "lora-co"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
                                            "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"]}
EMAIL = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
CHOICES = ["red", "green", "blue"]


def _check_city(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "population", "capital"}, text
    assert isinstance(value["city"], str) and len(value["city"]) <= 16
    assert type(value["population"]) is int and 0 <= value["population"] <= 10**8
    assert type(value["capital"]) is bool


CASES = [  # (request fields, check of the answer's text)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}},
     _check_city),
    ({"extra_body": {"structured_outputs": {"json": SCHEMA}}}, _check_city),
    ({"extra_body": {"structured_outputs": {"regex": EMAIL}}}, lambda t: re.fullmatch(EMAIL, t) is not None),
    ({"extra_body": {"structured_outputs": {"choice": CHOICES}}}, lambda t: t in CHOICES),
    ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "It is " color "."\ncolor ::= "red" | "blue"'}}},
     lambda t: t in ("It is red.", "It is blue.")),
]


def _completion_fields(fields: dict) -> dict:
    """``fields`` for the client's completions.create, which has no response_format argument (vLLM
    takes the field on /v1/completions: it goes in the body through extra_body)."""
    if "response_format" not in fields:
        return fields
    rest = {k: v for k, v in fields.items() if k != "response_format"}
    return {**rest, "extra_body": {**rest.get("extra_body", {}), "response_format": fields["response_format"]}}


def _server_model(server, tenant: str) -> tuple[str, str]:
    """(model, key): the base model for base-co, the LoRA for lora-co."""
    if tenant == "lora-co":
        return LORA, TENANT_KEYS["lora-co"]
    return server.server.generation.info.model, TENANT_KEYS["base-co"]


@pytest.mark.parametrize("tenant", ["base-co", "lora-co"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=["json_schema", "so_json", "regex", "choice", "grammar"])
def test_chat_answers_follow_the_spec_for_several_seeds(http_server, tenant, case):
    fields, check = CASES[case]
    if tenant == "lora-co" and check is _check_city:
        # the test LoRA likes newlines: JSON's free whitespace would fill max_tokens (vLLM's option; with
        # response_format, structured_outputs carries options only, as vLLM merges them)
        extra = fields.get("extra_body", {}).get("structured_outputs", {})
        fields = {**fields, "extra_body": {"structured_outputs": {**extra, "disable_any_whitespace": True}}}
    model, key = _server_model(http_server, tenant)
    api = client(http_server, key)

    def answer(seed: int):
        return api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a city."}],
                                           max_tokens=120, temperature=1.0, seed=seed, **fields)
    # so_json asks json_schema's schema through vLLM's own field: its spec is the same, one seed.
    # The seeds' requests are sent together: the engine runs them in one batch (a third of the steps)
    seeds = range(1 if case == 1 else 3)
    with ThreadPoolExecutor(len(seeds)) as pool:
        replies = list(pool.map(answer, seeds))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert check(choice.message.content) is not False, choice.message.content
        if fields.get("extra_body", {}).get("structured_outputs", {}).get("disable_any_whitespace"):
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', "", choice.message.content)
            assert not re.search(r"\s", outside_strings), choice.message.content


def test_json_object_on_completions_streamed_and_whole(http_server):
    model, key = _server_model(http_server, "base-co")
    api = client(http_server, key)
    kwargs = dict(model=model, prompt='A JSON object with a key "a":', max_tokens=60, temperature=0.0,
                  extra_body={"response_format": {"type": "json_object"}})
    with ThreadPoolExecutor(1) as pool:  # sent together: the engine runs both in one batch of steps
        pending = pool.submit(api.completions.create, **kwargs)
        streamed = list(api.completions.create(stream=True, **kwargs))
        whole = pending.result()
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == whole.choices[0].text
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # ran to max_tokens: a JSON object's prefix
        assert text.lstrip().startswith("{")


def test_streamed_chat_with_a_schema_parses_once_joined(http_server):
    model, key = _server_model(http_server, "base-co")
    chunks = client(http_server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe Paris."}], max_tokens=120, temperature=1.0,
        seed=3, stream=True, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    chunks = list(chunks)
    _check_city("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("fields, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format", "does not compile"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs", "does not compile"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs", "choice"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs", "exactly one"),
    ({"extra_body": {"structured_outputs": {"whitespace_pattern": " "}}}, "structured_outputs", "whitespace_pattern"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs", "not both"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"min_tokens": 3}}, "min_tokens", "min_tokens"),
])
def test_bad_specs_are_a_400_naming_the_field_and_nothing_queues(http_server, fields, param, says):
    model, key = _server_model(http_server, "base-co")
    api = client(http_server, key)
    before = http_server.engine.stats()["prompt_tokens"]
    for create in (lambda: api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=4, **fields),
                   lambda: api.completions.create(model=model, prompt="Hi", max_tokens=4,
                                                  **_completion_fields(fields))):
        with pytest.raises(openai.BadRequestError) as err:
            create()
        assert err.value.body["param"] == param and says in err.value.body["message"], err.value.body
    assert http_server.engine.stats()["prompt_tokens"] == before  # refused before the engine saw a prompt


def test_text_response_format_and_tools_unchanged(http_server):
    model, key = _server_model(http_server, "base-co")
    api = client(http_server, key)
    free = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0.0, response_format={"type": "text"})
    plain = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                        temperature=0.0)
    assert free.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["message"].startswith('"auto" tool choice requires --enable-auto-tool-choice')


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_logprobs_of_a_constrained_answer_are_the_masked_distribution_clamped(http_server, endpoint):
    """vLLM masks before its sampler: the allowed tokens hold all the probability, masked ones in the
    top-k come back as vLLM's -9999.0 (JSON has no -inf)."""
    model, key = _server_model(http_server, "base-co")
    api = client(http_server, key)
    so = {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}}
    if endpoint == "chat":
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is water wet?"}],
                                            max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=8, **so)
        assert reply.choices[0].message.content in ("yes", "no")
        first = {e.token: e.logprob for e in reply.choices[0].logprobs.content[0].top_logprobs}
    else:
        reply = api.completions.create(model=model, prompt="Is water wet? Answer:", max_tokens=4, temperature=0.0,
                                       logprobs=8, **so)
        assert reply.choices[0].text in ("yes", "no")
        first = reply.choices[0].logprobs.top_logprobs[0]
    allowed = [lp for lp in first.values() if lp > -9999.0]
    assert -9999.0 in first.values() and sum(math.exp(lp) for lp in allowed) == pytest.approx(1.0, abs=1e-4)


def test_every_choice_of_n_follows_the_spec(http_server):
    """n choices are n engine requests, each with a matcher of its own (seeds seed + i, as vLLM)."""
    model, key = _server_model(http_server, "base-co")
    reply = client(http_server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give an email address."}], max_tokens=40,
        temperature=1.0, seed=7, n=4, extra_body={"structured_outputs": {"regex": EMAIL}})
    assert len(reply.choices) == 4
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(EMAIL, choice.message.content), choice.message.content


def test_a_compile_that_runs_on_holds_no_other_tenants_prompt_back(http_server, monkeypatch):
    """base-co's spec compiles slowly (held at a gate): lora-co's plain request is answered meanwhile.
    Before, the compile's wait ran on the one tokenizer thread, and every other tenant's prompt
    waited behind it (up to 10 s a spec; a flooding tenant doubled the others' TTFT)."""
    gate, compile_for_real = threading.Event(), grammar_compiler._compile

    def compile_(compiler, spec):
        if spec.text == "slow[a-z]":
            gate.wait(60)
        return compile_for_real(compiler, spec)

    monkeypatch.setattr(grammar_compiler, "_compile", compile_)
    monkeypatch.setattr(http_server.engine.core.grammars, "timeout_s", 60.0)
    model, key = _server_model(http_server, "base-co")
    answers = []
    slow = threading.Thread(target=lambda: answers.append(client(http_server, key).completions.create(
        model=model, prompt="Hi", max_tokens=4, temperature=0, extra_body={"structured_outputs": {"regex": "slow[a-z]"}})))
    slow.start()
    try:
        other = client(http_server, TENANT_KEYS["lora-co"], timeout=30).completions.create(
            model=LORA, prompt="Hi", max_tokens=2, temperature=0)
        assert other.usage.completion_tokens == 2 and slow.is_alive()  # answered while the compile still waits
    finally:
        gate.set()
        slow.join(60)
    assert re.fullmatch("slow[a-z]", answers[0].choices[0].text)


def test_a_requests_stop_token_ids_end_its_grammar_as_vllms_do(http_server, tokenizer):
    """vLLM 0.32 gives its xgrammar matcher the request's ``all_stop_token_ids`` (every EOS id and
    its ``stop_token_ids``) as ``override_stop_tokens``: a stop token id is masked until the grammar
    may end, then allowed. Pushed by logit_bias (added after the mask), it ends the choice right
    after "yes" with stop_reason its id; an EOS ended it there before (the id was always masked)."""
    model, key = _server_model(http_server, "base-co")
    (stop,) = tokenizer.encode("!", add_special_tokens=False)
    reply = client(http_server, key).completions.create(
        model=model, prompt="Is water wet? Answer:", max_tokens=6, temperature=0.0, logit_bias={str(stop): 100},
        extra_body={"structured_outputs": {"choice": ["yes"]}, "stop_token_ids": [stop], "return_token_ids": True})
    out = reply.choices[0]
    assert out.text == "yes" and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.model_extra["token_ids"][-1] == stop and tokenizer.decode(out.model_extra["token_ids"][:-1]) == "yes"
