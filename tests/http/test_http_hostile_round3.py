"""Found by the third hostile review (round two, session 11): sampling values the float32 sampler
cannot honour, stop lists that would slow every tenant's steps, and a client gone mid-body. Each is
a 400 naming the field (or, for the client, no answer and no traceback), and the server answers the
next request as before."""

from __future__ import annotations

import logging
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from grpc_harness import ADMIN_KEY
from http_harness import base_url

from nlora_serve.engine.sample.sampling import FLOAT32_TINY, MAX_STOP_CHARS, MAX_STOP_STRINGS


def _post(server, **fields) -> requests.Response:
    body = {"model": server.server.generation.info.model, "prompt": "hi hi hi", "max_tokens": 2, **fields}
    return requests.post(f"{base_url(server)}/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def _refused(resp: requests.Response, param: str, *words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words), error


@pytest.mark.parametrize("field, value", [("top_p", 1e-46), ("top_p", 5e-324), ("top_p", 1e-39),
                                          ("repetition_penalty", 5e-324), ("repetition_penalty", 1e-40)])
def test_values_the_float32_sampler_cannot_honour_are_a_400(http_server, field, value):
    """They passed float64 validation and became 0 (or overflowed) in the float32 sampler, which
    then emitted token 0 (<|endoftext|>) whatever the logits said."""
    _refused(_post(http_server, temperature=1, **{field: value}), field, "float32")


def test_the_smallest_top_p_is_top_1(http_server):
    """top_p at float32's smallest normal keeps only the most likely token: the same tokens as greedy."""
    greedy = _post(http_server, temperature=0, max_tokens=6).json()["choices"][0]["text"]
    tiny = _post(http_server, temperature=1, top_p=FLOAT32_TINY, seed=7, max_tokens=6).json()["choices"][0]["text"]
    assert tiny == greedy


def test_stop_lists_are_bounded_and_errors_do_not_echo_them_whole(http_server):
    many = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    _refused(_post(http_server, stop=many), "stop", f"at most {MAX_STOP_STRINGS} strings")
    _refused(_post(http_server, stop=["x" * (MAX_STOP_CHARS + 1)]), "stop", f"at most {MAX_STOP_CHARS} characters")
    huge = _post(http_server, stop=["ab"] * 200_000)  # ~1.4 MB of JSON
    _refused(huge, "stop", "characters)")
    assert len(huge.content) < 2_000, len(huge.content)  # the message quotes 200 characters of it, not all
    ok = _post(http_server, stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)], temperature=0)
    assert ok.status_code == 200, ok.text


def test_a_client_gone_mid_body_gets_no_traceback(http_server, caplog):
    url = urlparse(base_url(http_server))
    caplog.set_level(logging.ERROR)
    for path in ("/v1/completions", "/v1/chat/completions"):
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: 100\r\n\r\n{{\"model\":".encode())
            time.sleep(0.5)
    time.sleep(1.0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert _post(http_server, temperature=0).status_code == 200


@pytest.mark.parametrize("body, marker", [
    # 404 quoting the name, shortened where it is quoted (errors.shown, as over gRPC)
    ({"model": "m" * 1_000_000, "prompt": "hi", "max_tokens": 1}, f"adapter '{'m' * 200}...' is not registered"),
    # 400 quoting an unknown field's name, the name cut where it is quoted (errors.shown, fb297e9)
    ({"prompt": "hi", "max_tokens": 1, "f" * 1_000_000: 1}, f"unsupported field '{'f' * 200}...'"),
    ({"prompt": "hi", "max_tokens": 1, "suffix": "x" * 1_000_000}, f"suffix='{'x' * 199}... is not"),  # its repr cut
])
def test_an_error_never_echoes_a_huge_input_whole(http_server, body, marker):
    body.setdefault("model", http_server.server.generation.info.model)
    resp = requests.post(f"{base_url(http_server)}/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code in (400, 404), resp.status_code
    assert len(resp.content) < 2_000, len(resp.content)
    assert marker in resp.json()["error"]["message"]


@pytest.mark.parametrize("field, value, good, words", [
    ("n", True, 1, "valid integer"), ("n", 1.0, 1, "valid integer"), ("best_of", True, 1, "valid integer"),
    ("use_beam_search", 0, False, "is not supported"), ("suffix", 0, "", "is not supported")])
def test_a_no_op_field_takes_only_its_exact_json_value(http_server, field, value, good, words):
    """JSON's true is no number, as the README says; Python's `True in (1,)` had let it through."""
    _refused(_post(http_server, **{field: value}), field, words)
    assert _post(http_server, temperature=0, **{field: good}).status_code == 200
