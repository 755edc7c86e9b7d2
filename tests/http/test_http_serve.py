"""`serve --http-port` as a process (the HTTP line, the official client, SIGTERM drains both front
ends, exit 0), and ports that cannot be bound."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from http_harness import client
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.server_config import ServerConfig, StartupError

ROOT = Path(__file__).parents[2]


class _Port:
    """What client() needs of a running server: its HTTP port."""

    def __init__(self, http_port: int):
        self.server = self
        self.http_port = http_port


def test_serve_process_answers_openai_clients_and_drains_on_sigterm(tmp_path):
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlora_serve.serving.commands.serve", "--port", "0", "--http-port", "0",
             "--dtype", "float32", "--adapter-dir", str(tmp_path / "store"), "--max-model-len", "512",
             "--drain-seconds", "5", "--log-level", "INFO"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ})
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # ready, the gRPC client hint, the HTTP API
        match = re.fullmatch(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1\n", lines[2])
        assert match, (lines, log_file.read_text())
        openai_client = client(_Port(int(match.group(1))), "no-auth-configured")
        [model] = [m.id for m in openai_client.models.list()]
        answer = openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=4, extra_body={"min_tokens": 4})
        assert answer.usage.completion_tokens == 4 and answer.choices[0].message.content
        # stopped with a stream running: it finishes in the drain, and the log says how many the stop caught
        stream = iter(openai_client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                                       stream=True, extra_body={"min_tokens": 12}))
        next(stream)
        proc.send_signal(signal.SIGTERM)
        assert [c.choices[0].finish_reason for c in stream][-1] == "length"
        assert proc.wait(timeout=30) == 0
        assert log_file.read_text().splitlines()[-2].endswith(
            "Z INFO nlora_serve.serve: shutting down: draining 1 admitted requests for up to 5 s (a second SIGTERM "
            "or Ctrl-C ends the drain now)")  # h99: how many; h148: how to cut it short
        assert log_file.read_text().splitlines()[-1].endswith("Z INFO nlora_serve.serve: drained, exiting")  # timed
    finally:
        if proc.poll() is None:
            proc.kill()


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("busy", ["http", "grpc"])
def test_a_busy_port_names_itself_and_leaves_nothing_bound(http_server, busy):
    free = _free_port()  # the other port start() binds first, and must release again
    with _listening() as taken:
        port = taken.getsockname()[1]
        config = (ServerConfig(port=0, http_port=port, metrics_port=free) if busy == "http"
                  else ServerConfig(port=port, http_port=free))
        gen = http_server.server.generation
        server = NloraServer(http_server.engine, config, Authenticator(None), gen.info, gen.tokenizer)
        with pytest.raises(StartupError) as err:
            http_server.call(server.start())
    if busy == "http":
        assert str(err.value) == f"cannot bind the HTTP port 127.0.0.1:{port} (--http-port): Address already in use"
    else:
        assert f"cannot bind the gRPC address 127.0.0.1:{port}" in str(err.value)
    assert server.port is server.metrics_port is server.http_port is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", free))  # released
