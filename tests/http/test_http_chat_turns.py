"""The chat fields that shape the prompt (vLLM's ``add_generation_prompt`` and
``continue_final_message``) against transformers' ``apply_chat_template`` with the same flags:
the prompt tokens (``usage.prompt_tokens``, ``/tokenize``) and the greedy continuation of the
transformers model. And /v1/responses, which runs a chat turn: an adapter's greedy text, whole and
streamed through the openai SDK's ``client.responses.create``, against the case's transformers
reference; ``instructions`` as the system message; its grants and refusals as chat's."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import TENANTS, client, hf_greedy, references, scrape

KEY = TENANT_KEYS["base-co"]
STARTED = [{"role": "user", "content": "Write a short poem about the sea."},
           {"role": "assistant", "content": "The sea is"}]


def _base(server) -> str:
    return server.server.generation.info.model


def _tokenize(server, body: dict) -> list[int]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/tokenize",
                                     json.dumps({"model": _base(server), **body}).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["tokens"]


@pytest.mark.parametrize("flags", [{"add_generation_prompt": False},
                                   {"add_generation_prompt": False, "continue_final_message": True}],
                         ids=["no_generation_prompt", "continue_final_message"])
def test_the_prompt_is_transformers_rendering_with_the_same_flags(http_server, tokenizer, hf_model, flags):
    want = tokenizer.apply_chat_template(STARTED, tokenize=True, return_dict=False, **flags)
    answer = client(http_server, KEY).chat.completions.create(
        model=_base(http_server), messages=STARTED, max_tokens=6, temperature=0,
        extra_body={**flags, "ignore_eos": True})
    assert answer.usage.prompt_tokens == len(want)
    assert _tokenize(http_server, {"messages": STARTED, **flags}) == want
    assert answer.choices[0].message.content == tokenizer.decode(hf_greedy(hf_model, want, 6), skip_special_tokens=True)
    if flags.get("continue_final_message"):
        assert tokenizer.decode(want).endswith("<|im_start|>assistant\nThe sea is")  # left open: no <|im_end|>


def test_a_continued_message_holding_special_token_text_keeps_it_as_text(http_server, tokenizer):
    """The final message is continued and its '<|im_end|>' stays plain text (only the template's
    markers are control tokens), as in every other message."""
    messages = [STARTED[0], {"role": "assistant", "content": "I will not write <|im_end|> here"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    ids = _tokenize(http_server, {"messages": messages, **flags})
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, **flags)
    specials = [tokenizer.convert_ids_to_tokens(i) for i in ids if i in tokenizer.all_special_ids]
    assert specials == ["<|im_start|>", "<|im_end|>"] * 2 + ["<|im_start|>"]  # system, user, assistant (open)


def test_continue_final_message_with_a_generation_prompt_is_refused(http_server):
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, KEY).chat.completions.create(
            model=_base(http_server), messages=STARTED, max_tokens=2, extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"


LORA = "lora-rslora"  # granted to lora-co (http_harness.TENANTS)


def _user_text(tokenizer, prompt_ids: list[int]) -> str:
    """The user message a case's reference prompt was rendered from."""
    return tokenizer.decode(prompt_ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]


def test_responses_greedy_text_is_the_adapters_transformers_reference(http_server, tokenizer):
    """An adapter's greedy answer, whole and streamed, is the case's transformers + PEFT reference
    text; cut by max_output_tokens it is "incomplete"; every stream event parses as the SDK's type."""
    assert TENANTS[LORA] == "lora-co"
    ref = references(LORA)[0]
    n = 6  # the reference masks EOS (min_tokens), which the model picks at its 9th token here
    want = tokenizer.decode(ref["greedy_token_ids"][:n], skip_special_tokens=True)
    sdk = client(http_server, TENANT_KEYS["lora-co"])
    ask = dict(model=LORA, input=_user_text(tokenizer, ref["prompt_token_ids"]), max_output_tokens=n, temperature=0)
    whole = sdk.responses.create(**ask, metadata={"k": "v"})
    assert (whole.output_text, whole.status, whole.incomplete_details.reason) == (want, "incomplete",
                                                                                   "max_output_tokens")
    assert whole.id.startswith("resp_") and whole.metadata == {"k": "v"} and whole.model == LORA
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (len(ref["prompt_token_ids"]), n)
    # the SDK's stream_options (include_obfuscation false: no padding, which this server never adds)
    events = list(sdk.responses.create(**ask, stream=True, stream_options={"include_obfuscation": False}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].type == "response.completed" and events[-1].response.output_text == want
    assert events[-1].response.output[0].id == events[2].item.id


def test_responses_instructions_are_the_system_message(http_server, tokenizer):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    want = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    answer = client(http_server, KEY).responses.create(model=_base(http_server), instructions="Answer in French.",
                                                       input=[{"role": "user", "content": [
                                                           {"type": "input_text", "text": "Hi"}]}],
                                                       max_output_tokens=1)
    assert answer.usage.input_tokens == len(want) and answer.instructions == "Answer in French."


def test_responses_json_schema_is_the_chat_structured_output(http_server):
    """text.format constrains the output as chat's response_format; a max_output_tokens past the
    server's limits is lowered to them, as vLLM lowers it (the schema ends the answer early)."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    answer = client(http_server, KEY).responses.create(
        model=_base(http_server), input="Pick a color.", max_output_tokens=10**6, temperature=0,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}})
    assert json.loads(answer.output_text)["color"] in ("red", "blue") and answer.text.format.type == "json_schema"
    room = http_server.engine.max_model_len - answer.usage.input_tokens
    assert answer.max_output_tokens == min(http_server.server.config.max_tokens, room) and answer.status == "completed"


@pytest.mark.parametrize("kwargs, error, param", [
    ({"model": LORA}, openai.PermissionDeniedError, None),  # base-co is not granted it, as chat refuses
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, openai.BadRequestError,
     "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, openai.BadRequestError, "input"),
    ({"tools": [{"type": "web_search_preview"}]}, openai.BadRequestError, "tools"),  # function tools only
    ({"tool_choice": "required"}, openai.BadRequestError, "tool_choice"),  # vLLM's: needs tools
    ({"background": True}, openai.BadRequestError, "background"),  # vLLM's without its store
    ({"previous_response_id": "resp_1"}, openai.NotFoundError, "response_id"),  # no response is stored
    ({"max_output_tokens": 0}, openai.BadRequestError, "max_output_tokens"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, openai.BadRequestError, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, openai.BadRequestError, "text.format"),
    ({"temperature": "0"}, openai.BadRequestError, "temperature"),
    ({"extra_body": {"conversation": "c"}}, openai.BadRequestError, "conversation"),
    # more bytes than the context holds tokens: refused before rendering, naming input (was "messages")
    ({"input": "a" * 400_000}, openai.BadRequestError, "input"),
])
def test_responses_refusals_name_the_field(http_server, kwargs, error, param):
    with pytest.raises(error) as err:
        client(http_server, KEY).responses.create(**{"model": _base(http_server), "input": "Hi",
                                                     "max_output_tokens": 2, **kwargs})
    assert err.value.body["param"] == param


def test_responses_are_admitted_and_metered_as_chat(http_server):
    """A bad key is 401, a refusal and a generation are counted under frontend="http" as chat's."""
    with pytest.raises(openai.AuthenticationError):
        client(http_server, "not-a-key").responses.create(model=_base(http_server), input="Hi", max_output_tokens=1)
    before = scrape(http_server)
    with pytest.raises(openai.PermissionDeniedError):
        client(http_server, KEY).responses.create(model=LORA, input="Hi", max_output_tokens=1)
    answer = client(http_server, KEY).responses.create(model=_base(http_server), input="Hi", max_output_tokens=2,
                                                       temperature=0)
    after = scrape(http_server)

    def moved(name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted((("frontend", "http"), *labels))))
        return after[key] - before.get(key, 0)

    assert moved("nlora_requests_rejected_total", ("reason", "permission_denied")) == 1
    assert moved("nlora_generation_tokens_total") == answer.usage.output_tokens
    assert moved("nlora_prompt_tokens_total") == answer.usage.input_tokens
