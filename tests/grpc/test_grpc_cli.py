"""`serve` as a process (example tenants, ready line, SIGTERM drain, exit 0) and the client CLI."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

from nlora_serve.client import NloraClient
from nlora_serve.client.cli import main as client_main
from nlora_serve.serving.keys_cli import main as keys_main

ROOT = Path(__file__).parents[2]


def _client(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = client_main(list(argv))
    return code, out.getvalue()


def test_serve_process_with_example_tenants_and_the_client_cli(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlora_serve.serving.serve_cli", "--port", "0", "--dtype", "float32",
         "--adapter-dir", str(tmp_path / "store"), "--example-tenants", "2", "--max-model-len", "512",
         "--drain-seconds", "5", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        ready = proc.stdout.readline()
        hint = proc.stdout.readline()
        match = re.match(r"ready on 127\.0\.0\.1:(\d+)", ready)
        assert match, (ready, proc.stderr.read() if proc.poll() is not None else "")
        server = f"127.0.0.1:{match.group(1)}"
        assert f"--server {server}" in hint and "--adapter tenant-000" in hint
        with NloraClient(server) as client:
            adapters, _ = client.list_adapters()
        assert [(a.name, a.tied, a.rank) for a in adapters] == [("tenant-000", True, 16), ("tenant-001", True, 16)]
        texts = {}
        for adapter in ("tenant-000", "tenant-001", None):
            flags = ["--adapter", adapter] if adapter else []
            code, texts[adapter] = _client("--server", server, "generate", "--prompt", "The capital of France is",
                                           "--max-tokens", "12", *flags)
            assert code == 0
        assert len(set(texts.values())) == 3  # perturbed N: each tenant differs from the other and the base
        assert _client("--server", server, "unload", "--name", "nobody")[0] == 2  # NOT_FOUND: one line, exit 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_keys_hash_reads_stdin_and_matches_sha256(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("my-secret-key\n"))
    assert keys_main(["hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"my-secret-key").hexdigest()
    assert keys_main(["new"]) == 0
    key, digest = (line.split()[-1] for line in capsys.readouterr().out.splitlines())
    assert hashlib.sha256(key.encode()).hexdigest() == digest and len(key) > 40
