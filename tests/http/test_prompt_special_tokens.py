"""A text prompt takes the tokenizer's special tokens (a BOS), as ``tokenizer(prompt)`` gives them
and vLLM's completions run them, over /v1/completions and gRPC ``text``, unless
``add_special_tokens`` is false; a chat takes only its template's; /tokenize counts what a
completion runs. The default model's tokenizer adds no BOS, so these run on a server whose
tokenizer is a copy of it that adds one (conftest ``bos_tokenizer_dir``), against transformers'
greedy tokens on the same ids."""

from __future__ import annotations

import dataclasses
import json

import pytest
import requests
import torch

from grpc_harness import matches_reference, server_factory, stop_all
from http_harness import client
from nlora_serve.client import NloraClient
from nlora_serve.client.cli import main as client_main
from nlora_serve.client.types import InvalidArgument

PROMPTS = ["The keeper of the lighthouse wrote", "Paris is the capital of"]
NEW = 8  # greedy tokens compared per request
CHAT = [{"role": "user", "content": "Name three rivers."}]
KEY = "any"  # no tenants file: any key works on loopback


@pytest.fixture(scope="module")
def bos_tokenizer(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_tokenizer_dir)


@pytest.fixture(scope="module")
def bos_server(base_fp32, bos_tokenizer_dir, bos_tokenizer, tmp_path_factory):
    """The default model's weights (shared, not copied) served with the BOS-adding tokenizer, by the
    engine and the front ends alike (as `serve --tokenizer DIR` does)."""
    base = dataclasses.replace(base_fp32, tokenizer_dir=bos_tokenizer_dir)
    make, running = server_factory(base, bos_tokenizer, tmp_path_factory.mktemp("bos"))
    yield make(http_port=0)
    stop_all(running)


@pytest.fixture(scope="module")
def references(hf_model, bos_tokenizer) -> dict[tuple[str, bool], tuple[list[int], list[int], list[float]]]:
    """(prompt, add_special_tokens) -> (transformers' prompt ids, its greedy tokens, their top-2 margins)."""
    refs = {}
    for prompt in PROMPTS:
        for special in (True, False):
            ids = bos_tokenizer(prompt, add_special_tokens=special).input_ids
            with torch.inference_mode():
                out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True, pad_token_id=2)
            margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            refs[prompt, special] = ids, out.sequences[0, len(ids):].tolist(), margins
    return refs


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{server.server.http_port}{path}", data=json.dumps(body), timeout=120,
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})


def _model(server) -> str:
    return server.server.generation.info.model


def test_the_references_tell_the_two_tokenizations_apart(references, bos_tokenizer):
    """Else the tests below could pass with the flag ignored: the BOS changes the greedy tokens."""
    for prompt in PROMPTS:
        (with_bos, tokens, _), (plain, plain_tokens, _) = references[prompt, True], references[prompt, False]
        assert with_bos == [bos_tokenizer.bos_token_id] + plain
        assert tokens != plain_tokens, prompt


@pytest.mark.parametrize("special", [None, True, False], ids=["default", "true", "false"])
def test_completions_run_the_ids_transformers_gives_the_text(bos_server, references, special):
    extra = {"min_tokens": NEW, "return_tokens_as_token_ids": True}
    if special is not None:
        extra["add_special_tokens"] = special
    for prompt in PROMPTS:
        ids, want, margins = references[prompt, special is not False]
        answer = client(bos_server, KEY).completions.create(model=_model(bos_server), prompt=prompt, max_tokens=NEW,
                                                            temperature=0, logprobs=0, extra_body=extra)
        got = [int(t.removeprefix("token_id:")) for t in answer.choices[0].logprobs.tokens]
        assert answer.usage.prompt_tokens == len(ids), (prompt, special)
        assert matches_reference(got, want, margins), (prompt, special, got, want)
        # token ids run as given, whatever the flag
        answer = client(bos_server, KEY).completions.create(model=_model(bos_server), prompt=ids, max_tokens=1,
                                                            temperature=0, extra_body={**extra, "min_tokens": 0})
        assert answer.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("special", [None, True, False], ids=["unset", "true", "false"])
def test_grpc_text_runs_the_ids_transformers_gives_the_text(bos_server, references, special):
    flag = {} if special is None else {"add_special_tokens": special}
    with NloraClient(bos_server.target, api_key=KEY, timeout=120) as grpc_client:
        for prompt in PROMPTS:
            ids, want, margins = references[prompt, special is not False]
            deltas = list(grpc_client.generate(prompt, max_tokens=NEW, min_tokens=NEW, **flag))
            got = [t for d in deltas for t in d.token_ids]
            assert deltas[-1].usage.prompt_tokens == len(ids), (prompt, special)
            assert matches_reference(got, want, margins), (prompt, special, got, want)
            deltas = list(grpc_client.generate(ids, max_tokens=1, **flag))  # token ids run as given
            assert deltas[-1].usage.prompt_tokens == len(ids)


def test_a_chat_takes_only_its_templates_special_tokens(bos_server, bos_tokenizer):
    rendered = bos_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    want = bos_tokenizer(rendered, add_special_tokens=False).input_ids
    assert want[0] == bos_tokenizer.bos_token_id and want[1] != bos_tokenizer.bos_token_id  # the template's one
    answer = client(bos_server, KEY).chat.completions.create(model=_model(bos_server), messages=CHAT, max_tokens=1)
    assert answer.usage.prompt_tokens == len(want)
    answer = client(bos_server, KEY).chat.completions.create(model=_model(bos_server), messages=CHAT, max_tokens=1,
                                                             extra_body={"add_special_tokens": False})
    assert answer.usage.prompt_tokens == len(want)  # vLLM's chat default, accepted
    with NloraClient(bos_server.target, api_key=KEY, timeout=120) as grpc_client:
        assert list(grpc_client.generate(messages=CHAT, max_tokens=1))[-1].usage.prompt_tokens == len(want)
        plain = list(grpc_client.generate(messages=CHAT, max_tokens=1, add_special_tokens=False))
        assert plain[-1].usage.prompt_tokens == len(want)
        with pytest.raises(InvalidArgument, match="add_special_tokens=true is not supported with chat"):
            list(grpc_client.generate(messages=CHAT, max_tokens=1, add_special_tokens=True))


@pytest.mark.parametrize("flag, special", [([], True), (["--no-add-special-tokens"], False)])
def test_client_generate_sends_the_flag_for_a_text_prompt(bos_server, references, capsys, flag, special):
    argv = ["--server", bos_server.target, "--api-key", KEY, "generate", "--prompt", PROMPTS[0], "--max-tokens", "1"]
    assert client_main(argv + flag) == 0
    # the closing status line: "[base model; N prompt + 1 tokens, ...]"
    assert f"[base model; {len(references[PROMPTS[0], special][0])} prompt + 1 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("special", [None, False], ids=["default", "false"])
def test_tokenize_counts_what_a_completion_runs_at_the_same_flag(bos_server, bos_tokenizer, special):
    flag = {} if special is None else {"add_special_tokens": special}
    for prompt in PROMPTS:
        counted = _post(bos_server, "/tokenize", {"model": _model(bos_server), "prompt": prompt, **flag})
        assert counted.status_code == 200, counted.text
        answer = client(bos_server, KEY).completions.create(model=_model(bos_server), prompt=prompt, max_tokens=1,
                                                            extra_body=flag or None)
        assert counted.json()["tokens"] == bos_tokenizer(prompt, add_special_tokens=special is None).input_ids
        assert counted.json()["count"] == answer.usage.prompt_tokens


@pytest.mark.parametrize("path, value, words", [
    ("/v1/completions", "yes", "valid boolean"), ("/v1/completions", 1, "valid boolean"),
    ("/v1/completions", None, "valid boolean"), ("/v1/chat/completions", "false", "valid boolean"),
    ("/v1/chat/completions", True, "add_special_tokens=true is not supported on /v1/chat/completions"),
])
def test_add_special_tokens_must_be_a_boolean_and_false_on_chat(bos_server, path, value, words):
    body = {"model": _model(bos_server), "max_tokens": 1, "add_special_tokens": value}
    body |= {"messages": CHAT} if "chat" in path else {"prompt": PROMPTS[0]}
    reply = _post(bos_server, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "add_special_tokens" and words in error["message"], error
    assert bos_server.server.admission.inflight == 0
