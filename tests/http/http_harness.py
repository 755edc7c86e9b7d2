"""The OpenAI client on a test server's HTTP port, and the cases' references (tests/data/cases)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import openai
import torch
from prometheus_client.parser import text_string_to_metric_families

CASES = Path(__file__).parents[1] / "data" / "cases"
TENANTS = {"inttune-nystrom-tied": "tied-co", "lora-rslora": "lora-co"}  # adapter -> the tenant granted it


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


def idle(server, within_s: float = 5.0) -> bool:
    """Whether the server holds no running or waiting request, KV block or admitted request within
    ``within_s`` seconds (polled: a client has its last bytes slightly before the server's own
    clean-up of the request ends; the check without waiting failed about one run in two on a
    loaded box)."""
    deadline = time.monotonic() + within_s
    while True:
        stats = server.engine.stats()
        if stats["kv_blocks_used"] == stats["running"] == stats["waiting"] == server.server.admission.inflight == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def client(server, api_key: str, timeout: float = 120.0) -> openai.OpenAI:
    """The official client on ``server`` (a grpc_harness.RunningServer); no retries, so every
    refusal reaches the test."""
    return openai.OpenAI(base_url=base_url(server), api_key=api_key, max_retries=0, timeout=timeout)


def async_client(server, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(server), api_key=api_key, max_retries=0, timeout=120.0)


def references(adapter: str | None) -> list[dict]:
    """The recorded greedy references of an adapter case (None: the base model)."""
    path = CASES / "BASE_GREEDY.json" if adapter is None else CASES / adapter / "case.json"
    return json.loads(path.read_text())["references"]


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every metric sample of ``server``: (name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def headers_only(server, key: str, content_length: int) -> socket.socket:
    """A connection that sent a completion request's headers and holds its body back."""
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode())
    return sock


def answer_then_closed(port: int, request: str) -> bytes:
    """The head of the answer to ``request`` (raw HTTP/1.1, kept alive: no Connection header); fails
    unless the server then closes the connection within 2 s (a draining server's 503)."""
    import pytest

    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request.encode())
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pytest.fail(f"the connection stayed open after the answer {got[:200]!r}")
    return got.partition(b"\r\n\r\n")[0]


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of the transformers model after ``prompt`` (float64 argmax of its logits,
    EOS included, as ``ignore_eos`` samples it): the independent reference of a greedy reply."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].double().argmax()))
    return ids[len(prompt):]
