"""`serve` as a process (example tenants, a ready line whose command works pasted, SIGTERM drain, exit 0)
and the client CLI (JSON results)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from nlora_serve import __version__
from nlora_serve.client import NloraClient
from nlora_serve.client.cli import main as client_main
from nlora_serve.cli import console_command
from nlora_serve.serving.commands.serve import client_hint, ready_lines
from nlora_serve.serving.commands.keys import main as keys_main

ROOT = Path(__file__).parents[2]


def _client(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = client_main(list(argv))
    return code, out.getvalue()


def test_serve_process_with_example_tenants_and_the_client_cli(tmp_path, base_fp32):
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlora_serve.serving.commands.serve", "--port", "0", "--http-port", "off", "--dtype", "float32",
             "--adapter-dir", str(tmp_path / "store"), "--example-tenants", "2", "--max-model-len", "512",
             "--adapter", f"lower={ROOT / 'examples/tenants/lower'}", "--drain-seconds", "5", "--log-level", "INFO"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ})
    try:
        ready = proc.stdout.readline()
        hint = proc.stdout.readline()
        match = re.match(r"ready on 127\.0\.0\.1:(\d+)", ready)
        assert match, (ready, log_file.read_text())
        # each long start-up phase is logged as it begins, in order, before the ready line
        phases = [r"INFO nlora_serve\.serve: loading model \S+ \(cpu, float32\)\.\.\.$",
                  r"INFO nlora_serve\.serve: model loaded in [\d.]+ s; starting the native engine and restoring "
                  r"the adapter store \S+\.\.\.$",
                  r"INFO nlora_serve\.serve: engine started in [\d.]+ s; registering the example tenants and "
                  r"--adapter folders\.\.\.$"]
        lines = log_file.read_text().splitlines()
        found = [[i for i, line in enumerate(lines) if re.search(phase, line)] for phase in phases]
        assert all(len(at) == 1 for at in found) and found == sorted(found), lines
        server = f"127.0.0.1:{match.group(1)}"
        script = Path(sys.executable).parent / "nlora-serve"  # the console script beside this interpreter
        # the trained --adapter tenant, as `make serve` starts it, not the untrained tenant-000
        assert hint == (f"  {script} client generate --server {server} --adapter lower --max-tokens 64 "
                        "--message \"Why serve many adapters on one base model?\"\n")
        pasted = subprocess.run(hint, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env={k: v for k, v in os.environ.items() if k != "NLORA_API_KEY"})
        assert pasted.returncode == 0 and pasted.stdout.strip(), pasted.stderr
        assert re.search(r"\[lower v1; \d+ prompt \+ \d+ tokens", pasted.stderr), pasted.stderr
        with NloraClient(server) as client:
            adapters, _ = client.list_adapters()
        assert [(a.name, a.tied, a.rank) for a in adapters] == [("lower", True, 16), ("tenant-000", True, 16),
                                                                 ("tenant-001", True, 16)]
        texts = {}
        for adapter in ("tenant-000", "tenant-001", None):
            flags = ["--adapter", adapter] if adapter else []
            code, texts[adapter] = _client("--server", server, "generate", "--prompt", "Once upon a time",
                                           "--max-tokens", "12", *flags)
            assert code == 0
        assert len(set(texts.values())) == 3  # perturbed N: each tenant differs from the other and the base
        code, info = _client("--server", server, "info")
        assert code == 0 and info.endswith("}\n")
        assert json.loads(info) == {"server_version": __version__, "model": "SmolLM2-135M-Instruct.Q4_1",
                                    "model_fingerprint": base_fp32.fingerprint, "dtype": "float32",
                                    "backend": "native", "max_rank": 64, "max_adapter_bytes": 256 << 20,
                                    "max_model_len": 512}
        code, listed = _client("--server", server, "list")  # a table: a line an adapter, then the base model's
        assert code == 0 and [line.split()[:4] for line in listed.splitlines()] == [
            ["NAME", "VERSION", "FLAVOUR", "RANK"], *([a.name, "1", a.flavour, "16"] for a in adapters),
            ["base", "model:", "this", "key"]]
        code, listed = _client("--server", server, "list", "--json")
        assert code == 0 and [a["content_hash"] for a in json.loads(listed)["adapters"]] == \
            [a.content_hash for a in adapters]
        code, unloaded = _client("--server", server, "unload", "--name", "tenant-001")
        assert code == 0 and unloaded.endswith("}\n")
        assert json.loads(unloaded) == {"name": "tenant-001", "version": 1, "content_hash": adapters[2].content_hash,
                                        "aborted_requests": 0, "draining_requests": 0}
        assert _client("--server", server, "unload", "--name", "nobody")[0] == 2  # NOT_FOUND: one line, exit 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert log_file.read_text().splitlines()[-1].endswith("Z INFO nlora_serve.serve: drained, exiting")  # timed
    finally:
        if proc.poll() is None:
            proc.kill()


def test_client_list_is_a_table_of_an_adapter_a_line():
    """h130: `client list` printed ~18 JSON lines an adapter; now a line each (the JSON under --json)."""
    from nlora_serve.client.cli import adapter_table
    from nlora_serve.client.types import AdapterInfo

    adapters = [AdapterInfo("lower", 1, "ab" * 32, "inttune-tied", 16, ("q_proj",), True, 215 * 1024, 0),
                AdapterInfo("plain-lora-x", 12, "cd" * 32, "lora", 8, ("q_proj", "v_proj"), False, 0, 3),
                AdapterInfo("big", 2, "ef" * 32, "nlora", 64, ("o_proj",), False, 5 << 20, 0)]
    assert adapter_table(adapters, True).splitlines() == [
        "NAME          VERSION  FLAVOUR       RANK   RESIDENT  ACTIVE",
        "lower               1  inttune-tied    16  215.0 KiB       0",
        "plain-lora-x       12  lora             8         no       3",
        "big                 2  nlora           64    5.0 MiB       0",
        "base model: this key may use it"]
    assert adapter_table([], False).splitlines() == ["no adapters this key may use", "base model: not for this key"]


def test_keys_hash_reads_stdin_and_matches_sha256(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("my-secret-key\n"))
    assert keys_main(["hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"my-secret-key").hexdigest()
    assert keys_main(["new"]) == 0
    key, digest = (line.split()[-1] for line in capsys.readouterr().out.splitlines())
    assert hashlib.sha256(key.encode()).hexdigest() == digest and len(key) > 40


def _new_entry(capsys, *flags: str) -> tuple[str, dict]:
    assert keys_main(["new", *flags]) == 0
    key_line, entry_line = capsys.readouterr().out.splitlines()
    assert key_line.startswith("key:")
    return key_line.split()[-1], json.loads(entry_line)


def test_keys_new_prints_tenant_and_admin_entries_the_server_loads_and_authenticates(tmp_path, capsys):
    # A newcomer's find (h80): building tenants.json meant cutting the key's hash out of `keys new`'s
    # output by hand. The entry it prints now, pasted as it is, loads and grants what was asked.
    from nlora_serve.serving.auth import Authenticator

    key, tenant = _new_entry(capsys, "--tenant", "acme", "--adapters", "acme", "acme-*")
    assert tenant == {"name": "acme", "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                      "adapters": ["acme", "acme-*"], "base_model": False}
    admin_key, admin = _new_entry(capsys, "--admin", "ops")
    assert admin == {"name": "ops", "key_sha256": hashlib.sha256(admin_key.encode()).hexdigest()}
    base_key, base = _new_entry(capsys, "--tenant", "tryout", "--base-model")
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"admin_keys": [admin], "tenants": [tenant, base]}))
    auth = Authenticator.from_file(path)
    acme = auth.authenticate([("authorization", f"Bearer {key}")])
    assert (acme.name, acme.is_admin) == ("acme", False)
    assert [acme.may_use(a) for a in ("acme", "acme-v2", "other", None)] == [True, True, False, False]
    tryout = auth.authenticate([("authorization", f"Bearer {base_key}")])
    assert [tryout.may_use(a) for a in ("acme", None)] == [False, True]
    assert auth.authenticate([("authorization", f"Bearer {admin_key}")]).is_admin


def test_keys_new_prints_a_tenants_weight_and_quota_as_the_server_reads_them(tmp_path, capsys):
    from nlora_serve.serving.auth import Authenticator

    key, entry = _new_entry(capsys, "--tenant", "big", "--adapters", "big-*", "--weight", "2.5",
                            "--max-concurrent-requests", "64")
    assert entry == {"name": "big", "key_sha256": hashlib.sha256(key.encode()).hexdigest(), "adapters": ["big-*"],
                     "base_model": False, "weight": 2.5, "max_concurrent_requests": 64}
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [entry]}))
    auth = Authenticator.from_file(path)
    big = auth.authenticate([("authorization", f"Bearer {key}")])
    assert (big.weight, big.max_concurrent_requests) == (2.5, 64) and auth.weights() == {"big": 2.5}


@pytest.mark.parametrize("flags, says", [
    (["--tenant", "", "--adapters", "acme"], "tenants[0].name must be a non-empty string"),  # the loader's rule
    (["--tenant", "acme", "--adapters", ""], "tenants[0].adapters must be a list of adapter names"),
    (["--tenant", "acme"], "would be granted nothing"),
    (["--adapters", "acme"], "give --tenant NAME too"),
    (["--admin", "ops", "--base-model"], "give --tenant NAME too"),
    (["--admin", "ops", "--weight", "2"], "give --tenant NAME too"),
    (["--tenant", "acme", "--base-model", "--weight", "0"], "tenants[0].weight must be a positive number"),
    (["--tenant", "acme", "--base-model", "--weight", "inf"], "tenants[0].weight must be a positive number"),
    (["--tenant", "acme", "--base-model", "--max-concurrent-requests", "0"],
     "tenants[0].max_concurrent_requests must be a positive integer"),
])
def test_keys_new_refuses_an_entry_the_tenants_file_would_not_load_and_prints_no_key(flags, says, capsys):
    assert keys_main(["new", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and says in err, err


def test_the_hint_of_an_auth_server_pasted_with_the_key_unset_still_parses():
    # A newcomer's find: `--api-key $NLORA_API_KEY` unquoted, with the variable unset, ate `--adapter`
    # as the key and the pasted command failed on "--api-key: expected one argument".
    server = SimpleNamespace(generation=SimpleNamespace(auth=SimpleNamespace(enabled=True)),
                             config=SimpleNamespace(host="127.0.0.1"), port=50051,
                             engine=SimpleNamespace(max_model_len=2048))
    hint = client_hint(server, ["tenant-000"])
    assert hint.startswith(console_command() + " ")
    env = {k: v for k, v in os.environ.items() if k != "NLORA_API_KEY"}
    for key in (None, "nls_k1"):  # bash's own word splitting of the pasted arguments
        done = subprocess.run(["bash", "-c", "printf '%s\\n' " + hint[len(console_command()):]], capture_output=True,
                              text=True, check=True, env=env if key is None else {**env, "NLORA_API_KEY": key})
        args = done.stdout.split("\n")[:-1]
        assert args[args.index("--api-key") + 1] == (key or "") and args[args.index("--adapter") + 1] == "tenant-000"


def test_the_ready_message_of_an_auth_server_says_which_key_the_hint_needs():
    # A newcomer's find (h54): with a tenants file the hint's --adapter tenant-000 failed with
    # PERMISSION_DENIED for the key of a tenant not granted it; nothing said an admin key was meant.
    def server(auth: bool, http_port: int | None = 8000):
        return SimpleNamespace(generation=SimpleNamespace(auth=SimpleNamespace(enabled=auth)),
                               config=SimpleNamespace(host="127.0.0.1"), port=50051, http_port=http_port,
                               engine=SimpleNamespace(max_model_len=2048))

    hint = "  " + client_hint(server(True), ["tenant-000"])
    # the HTTP line stays third, where scripts read it (tests/http/test_http_serve.py does)
    # and how to re-read the tenants file: the pid a shell shows under `make serve` is make's (h95)
    assert ready_lines(server(True), ["tenant-000"], pid=4321) == [
        "ready on 127.0.0.1:50051; try:", hint, "OpenAI-compatible HTTP API on http://127.0.0.1:8000/v1",
        "  ($NLORA_API_KEY: an admin key, or the key of a tenant granted tenant-000)",
        "  (kill -HUP 4321 re-reads the tenants file after an edit)"]
    assert ready_lines(server(True, None), [])[2] == "  ($NLORA_API_KEY: an admin key, or the key of a tenant " \
                                                     "allowed the base model)"
    assert len(ready_lines(server(False), ["tenant-000"])) == 3  # no keys: nothing to say
