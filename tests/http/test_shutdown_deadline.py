"""Shutdown past ``--drain-seconds`` (issue 16): every request still running at the deadline is
told, in the README's shape for server aborts, and the process exits 0 with no traceback.

A real ``serve`` process with three long requests in flight (an HTTP SSE stream, a whole HTTP
response, a gRPC stream) gets SIGTERM with ``--drain-seconds 2``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from nlora_serve.client import NloraClient
from nlora_serve.client.types import NloraClientError

ROOT = Path(__file__).parents[2]
LONG = {"max_tokens": 900, "min_tokens": 900}  # far longer than the drain period on this CPU


def _start(tmp_path: Path):
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlora_serve.serving.commands.serve", "--port", "0", "--http-port", "0",
         "--dtype", "float32", "--max-model-len", "1024", "--drain-seconds", "2", "--log-level", "INFO"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ})
    log.close()
    lines = [proc.stdout.readline() for _ in range(3)]  # ready, the client hint, the HTTP line
    grpc_port = re.match(r"ready on 127\.0\.0\.1:(\d+);", lines[0])
    http_port = re.fullmatch(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1\n", lines[2])
    assert grpc_port and http_port, (lines, (tmp_path / "serve.log").read_text())
    return proc, int(grpc_port.group(1)), f"http://127.0.0.1:{http_port.group(1)}/v1"


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_requests_running_at_the_drain_deadline_are_told_and_the_process_exits_cleanly(tmp_path):
    proc, grpc_port, url = _start(tmp_path)
    try:
        with requests.Session() as http:
            model = http.get(f"{url}/models", timeout=60).json()["data"][0]["id"]
            body = {"model": model, "prompt": "Count:", **LONG}
            sse_lines: list[str] = []

            def sse():
                with requests.post(f"{url}/completions", json={**body, "stream": True}, stream=True,
                                   timeout=120) as resp:  # a broken chunked body raises here
                    for line in resp.iter_lines(decode_unicode=True):
                        if line:
                            sse_lines.append(line)
                return resp.status_code
            sse_thread, sse_result = _in_thread(sse)
            whole_thread, whole = _in_thread(lambda: requests.post(f"{url}/completions", json=body, timeout=120))

            def grpc_stream():
                with NloraClient(f"127.0.0.1:{grpc_port}", timeout=120) as client:
                    return [d for d in client.generate("Count:", **LONG)]
            grpc_thread, grpc_result = _in_thread(grpc_stream)
            deadline = time.monotonic() + 60
            while len(sse_lines) < 3 and time.monotonic() < deadline:  # every request is generating
                time.sleep(0.05)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            for thread in (sse_thread, whole_thread, grpc_thread):
                thread.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "serve.log").read_text()
    # the SSE stream: an error event naming the shutdown, no [DONE], a cleanly ended body
    assert sse_result.get("value") == 200, (sse_result, log)
    last = json.loads(sse_lines[-1].removeprefix("data: "))
    assert last["error"]["code"] == "aborted" and "shutting down" in last["error"]["message"], sse_lines[-2:]
    assert "data: [DONE]" not in sse_lines
    # the whole response: an OpenAI-shaped error naming the shutdown
    resp = whole.get("value")
    assert resp is not None, whole
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "aborted", resp.text
    assert "shutting down" in resp.json()["error"]["message"] and "--drain-seconds" in resp.json()["error"]["message"]
    # gRPC: ABORTED naming the shutdown
    err = grpc_result.get("error")
    assert isinstance(err, NloraClientError) and err.code.name == "ABORTED", grpc_result
    assert "shutting down" in str(err)
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert log.splitlines()[-1].endswith("exiting"), log
    assert "drain ended after --drain-seconds" in log, log  # not by a second signal
