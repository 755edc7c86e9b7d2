"""Found by the fourth hostile review: integers past Python's digit limit, out-of-range prompt ids
without a param, empty adapter uploads, and finite adapter values that overflow when served. Each
is a 400 (INVALID_ARGUMENT on gRPC) naming the field or tensor, and the server serves on."""

from __future__ import annotations

import json
import shutil
import sys

import grpc
import pytest
import requests
import safetensors.torch
import torch

from grpc_harness import ADMIN_KEY
from http_harness import CASES, base_url

from nlora_serve.client import InvalidArgument, NloraClient
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc

LONG = "7" * 5000  # over sys.get_int_max_str_digits() (4300): json.loads itself raised on it
TIED = "inttune-nystrom-tied"


def _post_raw(server, body: str, path: str = "completions") -> requests.Response:
    return requests.post(f"{base_url(server)}/{path}", data=body.encode(), timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})


def _body(server, raw_fields: dict[str, str], chat: bool = False) -> str:
    """A JSON body whose ``raw_fields`` values are spliced in as written (json.dumps cannot write LONG)."""
    fields = {"model": json.dumps(server.server.generation.info.model), "max_tokens": "2"}
    fields["messages" if chat else "prompt"] = json.dumps([{"role": "user", "content": "hi"}] if chat else "hi hi")
    fields.update(raw_fields)
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def _refused(resp: requests.Response, param: str, *words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words), error
    assert len(resp.content) < 2_000, len(resp.content)


def test_the_digit_limit_is_what_the_review_hit():
    assert len(LONG) > sys.get_int_max_str_digits() > 0
    with pytest.raises(ValueError, match="digits"):
        json.loads(LONG)


@pytest.mark.parametrize("field, raw, chat", [
    ("max_tokens", LONG, False), ("max_tokens", "-" + LONG, False), ("n", LONG, False), ("seed", LONG, False),
    ("top_k", LONG, False), ("logprobs", LONG, False), ("min_tokens", LONG, False),
    ("prompt", f"[1, 2, {LONG}]", False), ("stop_token_ids", f"[{LONG}]", False),
    ("max_completion_tokens", LONG, True), ("top_logprobs", LONG, True), ("seed", LONG, True),
])
def test_an_integer_past_pythons_digit_limit_is_out_of_range_not_bad_json(http_server, field, raw, chat):
    resp = _post_raw(http_server, _body(http_server, {field: raw}, chat), "chat/completions" if chat else "completions")
    _refused(resp, field, "out of range", "(5000 digits)")
    if raw.startswith("["):
        assert f"{field}[{raw.count(',')}] = 77777777... (5000 digits)" in resp.json()["error"]["message"]


@pytest.mark.parametrize("field, raw, chat", [
    ("n", "7" * 30, False), ("seed", "7" * 30, False),
    ("top_k", "7" * 30, False), ("logprobs", "7" * 30, False), ("min_tokens", "7" * 30, False),
    ("prompt", f"[1, {'7' * 30}]", False), ("stop_token_ids", f"[{'7' * 30}]", False),
    ("top_logprobs", "7" * 30, True), ("seed", "7" * 30, True),
])
def test_every_integer_field_refuses_a_large_value_naming_itself(http_server, field, raw, chat):
    """Below the digit limit each field's own range check answers, with the field as param."""
    resp = _post_raw(http_server, _body(http_server, {field: raw}, chat), "chat/completions" if chat else "completions")
    _refused(resp, field)


def test_a_too_large_max_tokens_is_lowered_and_one_past_the_digit_limit_refused_naming_it(http_server):
    """An ordinary too-large max_tokens (20 or 30 digits) is lowered to the server's --max-tokens and
    the context, as vLLM 0.32 lowers it (a prompt 3 tokens short of the context: 3 tokens, "length");
    past Python's digit limit it is a 400 on param max_tokens, as every integer field there."""
    room = 3
    prompt = json.dumps([1] + [30] * (http_server.engine.max_model_len - room - 1))
    for digits in (20, 30):
        served = _post_raw(http_server, _body(http_server, {"max_tokens": "7" * digits, "prompt": prompt}))
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["completion_tokens"] == room, served.json()["usage"]
        assert served.json()["choices"][0]["finish_reason"] == "length"
    _refused(_post_raw(http_server, _body(http_server, {"max_tokens": LONG})), "max_tokens", "out of range")
    ok = _post_raw(http_server, _body(http_server, {"temperature": "0"}))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("ids", [[1, 10 ** 6], [-1, 5], [49152]])
def test_out_of_range_prompt_ids_name_the_prompt_param(http_server, base_fp32, ids):
    vocab = json.loads((base_fp32.path / "config.json").read_text())["vocab_size"]
    resp = _post_raw(http_server, _body(http_server, {"prompt": json.dumps(ids)}))
    _refused(resp, "prompt", f"prompt token ids must be in [0, {vocab})")
    assert _post_raw(http_server, _body(http_server, {"prompt": json.dumps([1, 2, 3])})).status_code == 200


def _adapter_dir(tmp_path, name: str, weights: bytes | None = None, tensors: dict | None = None):
    folder = tmp_path / name
    shutil.copytree(CASES / TIED, folder)
    data = weights if weights is not None else safetensors.torch.save(tensors)
    (folder / "adapter_model.safetensors").write_bytes(data)
    return folder


@pytest.mark.parametrize("weights, words", [
    (b"", "adapter_model.safetensors is empty (0 bytes); expected a safetensors file: an 8-byte"),
    (b"\x01\x02\x03", "adapter_model.safetensors is 3 bytes, too short; expected a safetensors file"),
])
def test_an_empty_or_tiny_upload_says_so(http_server, tmp_path, weights, words):
    with NloraClient(http_server.target, api_key=ADMIN_KEY) as admin:
        with pytest.raises(InvalidArgument, match=words.replace("(", r"\(").replace(")", r"\)")):
            admin.upload_adapter("empty", _adapter_dir(tmp_path, "empty", weights))
        admin.upload_adapter(TIED, CASES / TIED)
        with pytest.raises(InvalidArgument, match=words.replace("(", r"\(").replace(")", r"\)")):
            admin.swap_adapter(TIED, weights)
    assert "empty" not in {v.name for v in http_server.engine.adapters.versions()}


@pytest.mark.parametrize("value", [3e38, 1e30])
def test_an_adapter_that_overflows_when_served_is_refused_at_upload_and_swap(http_server, tmp_path, value):
    """It had been accepted, and every request on the tenant then failed with a 500."""
    tensors = safetensors.torch.load_file(CASES / TIED / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_N.weight"))
    bad = dict(tensors, **{key: torch.full_like(tensors[key], value)})
    with NloraClient(http_server.target, api_key=ADMIN_KEY) as admin:
        with pytest.raises(InvalidArgument, match=f"tensor '{key}'"):
            admin.upload_adapter("overflow", _adapter_dir(tmp_path, "overflow", tensors=bad))
        current = admin.upload_adapter(TIED, CASES / TIED).version
        with pytest.raises(InvalidArgument, match=f"tensor '{key}'"):
            admin.swap_adapter(TIED, safetensors.torch.save({k: v for k, v in bad.items() if "lora_N" in k}))
    assert http_server.engine.adapters.registry.get(TIED).version == current
    ok = _post_raw(http_server, json.dumps({"model": TIED, "prompt": "hi hi", "max_tokens": 2, "temperature": 0}))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"], ok.text


def test_non_finite_logits_fail_only_their_own_request_with_a_clear_error(http_server, monkeypatch, caplog):
    """What an adapter inside the bounds may still do (or a fault): its request ends with a 500
    naming the adapter and the cause, no traceback is logged, and a base-model request sent at
    the same time completes with the text it gets alone."""
    import logging
    import threading

    body = lambda model: json.dumps({"model": model, "prompt": "hi hi", "max_tokens": 8, "temperature": 0,  # noqa: E731
                                     "ignore_eos": True})
    alone = _post_raw(http_server, body(http_server.server.generation.info.model)).json()["choices"][0]["text"]
    runner = http_server.engine.core.runner
    execute = runner.execute

    def overflow(pairs, previous=None):
        logits = execute(pairs, previous)
        sampling = [seq for seq, n in pairs if seq.num_computed_tokens + n == seq.num_tokens]
        for row, seq in enumerate(sampling):
            if seq.adapter is not None:
                logits[row, 7] = float("inf")
        return logits

    monkeypatch.setattr(runner, "execute", overflow)
    caplog.set_level(logging.ERROR)
    results = {}
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, _post_raw(http_server, body(m))))
               for m in (TIED, http_server.server.generation.info.model)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad, good = results[TIED], results[http_server.server.generation.info.model]
    assert bad.status_code == 500 and "logits on adapter 'inttune-nystrom-tied'" in bad.json()["error"]["message"]
    assert "not finite" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_an_upload_with_an_empty_config_says_so(http_server):
    weights = (CASES / TIED / "adapter_model.safetensors").read_bytes()
    header = pb.UploadAdapterRequest(header=pb.UploadHeader(name="noconfig", adapter_config_json="",
                                                            safetensors_bytes=len(weights)))
    with grpc.insecure_channel(http_server.target) as channel:
        upload = pb_grpc.AdapterAdminStub(channel).UploadAdapter
        with pytest.raises(grpc.RpcError) as err:
            upload(iter([header, pb.UploadAdapterRequest(chunk=weights)]),
                   metadata=(("authorization", f"Bearer {ADMIN_KEY}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter_config.json is empty; expected a JSON object" in err.value.details()
