"""`serve` refuses bad flags, an unusable adapter store and busy ports with one `error:` line that
names the flag or the host:port, exit 2, and no traceback (README: expected failures)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nlora_serve import cli
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.errors import ModelError, NloraError
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build
from nlora_serve.serving.commands import serve_checks
from nlora_serve.serving.commands.backend import make_engine
from nlora_serve.serving.auth import AuthError, Authenticator
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.server_config import ServerConfig, StartupError

ROOT = Path(__file__).parents[2]


@pytest.fixture
def no_model(monkeypatch):
    """Flags must be refused before the model loads: loading it fails the test."""
    def load_base(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(serve_build, "load_base", load_base)


def _args(tmp_path: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    return parser.parse_args(["--port", "0", "--http-port", "0", "--adapter-dir", str(tmp_path / "store"), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--max-queue", "0"], "--max-queue 0: must be a positive integer; got 0"),
    (["--port", "70000"], "--port 70000: must be a port number in [0, 65535]; got 70000"),
    (["--metrics-port", "-3"], "--metrics-port -3: must be a port number in "
                               "[0, 65535]; got -3"),
    (["--port", "8000", "--http-port", "8000"],
     "--port 8000 and --http-port 8000: one port for two servers; --port is the gRPC port here (vLLM's --port is "
     "its HTTP port: here --http-port, default 8000)"),
    (["--http-port", "9400", "--metrics-port", "9400"], "--http-port 9400 and --metrics-port 9400: one port for two "
                                                          "servers"),
    (["--served-model-name", " "], "--served-model-name  : must not be empty"),
    (["--max-rank", "0"], "--max-rank 0: must be a positive integer; got 0"),
    (["--drain-seconds", "-1"], "--drain-seconds -1.0: must be >= 0; got -1.0"),
    (["--max-tokens", "0"], "--max-tokens 0: must be a positive integer; got 0"),
    (["--max-model-len", "0"], "--max-model-len 0: must be a positive integer; "
                               "got 0"),
    # 1 started, though no request fits (a prompt token and a generated one)
    (["--max-model-len", "1"], "--max-model-len 1: must be >= 2 (one prompt token "
                               "and one generated token); got 1"),
    (["--max-num-batched-tokens", "8"], "--max-num-batched-tokens 8: must be >= --max-num-seqs (64)"),
    (["--dtype", "half"], "--dtype half: this engine computes in float32 or bfloat16 only (it has no float16 "
                          "kernels); use --dtype bfloat16 (2 bytes a value, as float16) or float32"),
    (["--dtype", "float16"], "--dtype float16: this engine computes in float32 or bfloat16 only (it has no float16 "
                             "kernels); use --dtype bfloat16 (2 bytes a value, as float16) or float32"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0: not a loopback address and no "
                            "tenants file is configured: without auth the server binds only to 127.0.0.1 "
                            "(give --tenants-file to listen on other interfaces)"),
])
def test_flags_out_of_range_name_the_flag(tmp_path, no_model, flags, message):
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, *flags))
    assert str(err.value) == message
    assert not (tmp_path / "store").exists()  # refused before anything was created


@pytest.mark.parametrize("name", ["../x", "/etc", "a b", "ü", ".hidden", "x" * 129])
def test_an_adapter_flag_with_a_name_no_adapter_can_have_is_a_usage_error(tmp_path, capsys, name):
    """It was refused only after the model had loaded, by the store, without naming the flag."""
    with pytest.raises(SystemExit) as exit_:
        _args(tmp_path, "--adapter", f"{name}=examples/tenants/lower")
    assert exit_.value.code == 2
    assert f"argument --adapter: adapter name {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "a=x", "--adapter", "a=y"], "--adapter a=y: adapter 'a' is also named by --adapter a=x; "
                                               "give each adapter its own name"),
    (["--adapter", "a=x", "--adapter", "a=x"], "--adapter a=x: adapter 'a' is also named by --adapter a=x; "
                                               "give each adapter its own name"),
    (["--adapter", "acme=x", "--adapter", "ACME=y"],
     "--adapter ACME=y: adapter 'ACME' is also named by --adapter acme=x (as 'acme': names differing only in case "
     "are one folder of the store on a case-insensitive file system); give each adapter its own name"),
    (["--adapter", "tenant-001=x", "--example-tenants", "2"],
     "--example-tenants 2: adapter 'tenant-001' is also named by --adapter tenant-001=x; give each adapter its own "
     "name"),
])
def test_two_flags_naming_one_adapter_are_refused_before_loading(tmp_path, no_model, flags, message):
    """The later one was registered as a new version over the earlier, silently (the store kept both)."""
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, *flags))
    assert str(err.value) == message
    assert list((tmp_path / "store").iterdir()) == []  # (created and probed) nothing written


def test_max_model_len_over_the_model_is_refused_before_loading(tmp_path, no_model, base_fp32):
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, "--max-model-len", "100000"))
    # SmolLM2-135M-Instruct's config.json: max_position_embeddings 8192
    assert str(err.value) == (f"--max-model-len 100000 exceeds the model's max_position_embeddings 8192 "
                              f"({base_fp32.path / 'config.json'})")


def test_a_dummy_model_without_a_config_is_one_error_line_before_loading(tmp_path, no_model):
    # `serve --load-format dummy --model DIR` on a DIR without config.json ended in a FileNotFoundError traceback
    with pytest.raises(ModelError) as err:
        serve_cli.build(_args(tmp_path, "--load-format", "dummy", "--model", str(tmp_path / "none")))
    assert str(err.value) == f"{tmp_path / 'none' / 'config.json'}: no config.json; expected a Hugging Face model directory"


def test_an_adapter_the_limits_refuse_is_named_by_its_flag(tmp_path, base_fp32, monkeypatch):
    # the reader's message named a module and the limit, not which of several --adapter flags it was
    engines = []
    monkeypatch.setattr(serve_build, "make_engine", lambda *a, **k: engines.append(make_engine(*a, **k)) or engines[-1])
    with pytest.raises(NloraError) as err:
        serve_cli.build(_args(tmp_path, "--max-rank", "8", "--adapter", f"lower={ROOT / 'examples/tenants/lower'}"))
    assert not engines[0].step_thread_alive()  # the refused start stopped its engine
    assert str(err.value).startswith(f"--adapter lower={ROOT / 'examples/tenants/lower'}: rank 16 of ")
    assert "exceeds the server's max rank 8 (--max-rank)" in str(err.value)


def test_an_adapter_vllm_cannot_serve_is_refused_before_vllm_starts(tmp_path, base_fp32, monkeypatch):
    # a lora_B bias was refused only at registration, after vLLM's minute-long start
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig

    monkeypatch.setattr(serve_checks, "backend_config", lambda args: VllmBackendConfig())
    monkeypatch.setattr(serve_build, "make_engine", lambda *a: pytest.fail("vLLM started before the check"))
    folder = ROOT / "tests/data/cases/lora-bias"
    with pytest.raises(NloraError) as err:
        serve_cli.build(_args(tmp_path, "--adapter", f"biased={folder}"))
    assert str(err.value).startswith(f"--adapter biased={folder}: the vLLM backend serves no lora_B bias")
    fifo = tmp_path / "fifo"  # its config a FIFO: the check's read blocked the start for good
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")
    # refused by serve_checks' folder check, before the model loads (h117), as read_config refuses a FIFO
    with pytest.raises(NloraError, match=f"^--adapter f={fifo}: {fifo}/adapter_config.json: not a regular file"):
        serve_cli.build(_args(tmp_path, "--adapter", f"f={fifo}"))


def test_a_failed_start_leaves_the_store_byte_identical(base_fp32, tmp_path, monkeypatch):
    # h141: a start on another model wrote its examples, then refused an --adapter made for the default
    # model ("layer 10 is out of range"); the examples' versions stayed, those they replaced were pruned.
    # Here the --adapter is made for another model (its config names another base fingerprint).
    from types import SimpleNamespace

    from nlora_serve.adapters.runtime.manager import AdapterManager

    root, lower = tmp_path / "store", ROOT / "examples/tenants/lower"
    AdapterManager(base_fp32, root).register_dir("keep", ROOT / "tests/data/cases/lora-layers-subset")
    bad = tmp_path / "other-models-lower"
    shutil.copytree(lower, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["nlora_serve"]["base_fingerprint"] = "0" * 64
    (bad / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(serve_build, "load_base", lambda *a, **k: base_fp32)
    # the engine's adapters alone (a real AdapterManager on the store): what the start registers with
    monkeypatch.setattr(serve_build, "make_engine", lambda config, base, backend: SimpleNamespace(
        adapters=AdapterManager(base, config.adapter_dir), shutdown=lambda: None))
    before = _store_files(root)
    with pytest.raises(NloraError, match=f"^--adapter bad={bad}: .*not of the loaded base"):
        serve_cli.build(_args(tmp_path, "--dtype", "float32", "--example-tenants", "2",
                              "--adapter", f"lower={lower}", "--adapter", f"bad={bad}"))
    assert _store_files(root) == before


def test_a_start_whose_port_is_taken_after_the_checks_leaves_the_store_byte_identical(base_fp32, tmp_path,
                                                                                      monkeypatch):
    # The start's registrations were committed when build() returned: a port taken while the model
    # loaded (serve_checks found it free) failed the bind in serve() after the examples, the --adapter
    # and the base-model record had been written. A real engine and a real bind; the model load faked.
    root, lower = tmp_path / "store", ROOT / "examples/tenants/lower"
    from nlora_serve.adapters.runtime.manager import AdapterManager

    AdapterManager(base_fp32, root).register_dir("keep", ROOT / "tests/data/cases/lora-layers-subset")
    with _listening() as probe:
        port = probe.getsockname()[1]  # free when the flags are checked
    monkeypatch.setattr(serve_build, "load_base", lambda *a, **k: base_fp32)
    monkeypatch.setattr(serve_cli, "freeze_startup_heap", lambda: None)  # the test worker's heap stays collectable
    taken, build = [], serve_cli.build

    def build_then_lose_the_port(*args):
        built = build(*args)
        taken.append(socket.create_server(("127.0.0.1", port)))  # another process's, now
        return built

    monkeypatch.setattr(serve_cli, "build", build_then_lose_the_port)
    before = _store_files(root)
    try:
        with pytest.raises(StartupError, match=f"^cannot bind the gRPC address 127.0.0.1:{port} "):
            serve_cli.run_serve(_args(tmp_path, "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes",
                                      str(32 << 20), "--example-tenants", "2", "--adapter", f"lower={lower}",
                                      "--port", str(port), "--http-port", "off"))
    finally:
        for sock in taken:
            sock.close()
    assert taken and _store_files(root) == before


def _store_files(root: Path) -> dict[str, bytes | None]:
    """Every entry under the store, staging area included, by path: a file's bytes, None for a folder."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_native_only_flag_on_the_vllm_backend_is_its_first_refusal(tmp_path, no_model, monkeypatch):
    # --device cuda:1 was refused as "torch sees no CUDA GPU" on a CPU machine (and ran on vLLM's own
    # device on a GPU one): the flag is wrong for the backend, wherever it runs; vllm need not be here
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, "--backend", "vllm", "--device", "cuda:1"))
    assert str(err.value).startswith("--device cuda:1: the native engine's flag, not carried out by vLLM: ")
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_unwritable_adapter_dir_is_refused_before_loading(tmp_path, no_model):
    (tmp_path / "a-file").write_text("not a folder")
    store = tmp_path / "a-file" / "store"
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, "--adapter-dir", str(store)))
    assert str(err.value) == f"--adapter-dir {store}: cannot create or write the adapter store there (Not a directory)"


def test_a_tenants_file_without_a_key_is_refused_before_loading(tmp_path, no_model):
    path = tmp_path / "tenants.json"  # it started, and refused every request with 401
    path.write_text('{"tenants": [], "admin_keys": []}')
    with pytest.raises(AuthError) as err:
        serve_cli.build(_args(tmp_path, "--tenants-file", str(path)))
    assert str(err.value).startswith(f"tenants file {path}: holds no key (no entry in 'tenants' or 'admin_keys'), "
                                     "so every request would be refused; ")


def test_cli_prints_one_error_line_exit_2_and_the_traceback_only_under_debug(monkeypatch, capsys, caplog, tmp_path):
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # keep pytest's handlers
    argv = ["serve", "--adapter-dir", str(tmp_path / "store"), "--max-queue", "0"]
    line = "error: --max-queue 0: must be a positive integer; got 0\n"
    assert cli.main(["--log-level", "INFO", *argv]) == 2
    assert capsys.readouterr().err == line
    with caplog.at_level(logging.DEBUG, logger="nlora_serve"):
        assert cli.main(["--log-level", "DEBUG", *argv]) == 2
    assert capsys.readouterr().err == line
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.DEBUG and record.exc_info[0] is StartupError


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _second_server(running, **config) -> NloraServer:
    """A server over ``running``'s engine, not started."""
    gen = running.server.generation
    return NloraServer(running.engine, ServerConfig(**config), Authenticator(None), gen.info, gen.tokenizer)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_busy_grpc_port_names_the_address_and_releases_the_metrics_port(make_server):
    running = make_server()
    metrics_port = _free_port()
    with _listening() as busy:
        port = busy.getsockname()[1]
        server = _second_server(running, port=port, metrics_port=metrics_port)
        with pytest.raises(StartupError) as err:
            running.call(server.start())
    assert str(err.value) == (f"cannot bind the gRPC address 127.0.0.1:{port} (--host/--port): it is in use "
                              "or not an address of this machine")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", metrics_port))  # the metrics endpoint it had started is closed again


def test_busy_metrics_port_names_it_and_binds_no_grpc_port(make_server):
    running = make_server()
    with _listening() as busy:
        port = busy.getsockname()[1]
        server = _second_server(running, port=0, metrics_port=port)
        with pytest.raises(StartupError) as err:
            running.call(server.start())
    assert str(err.value) == f"cannot bind the metrics port 127.0.0.1:{port} (--metrics-port): Address already in use"
    assert server.port is None  # refused before the gRPC port was bound


def test_a_grpc_only_server_says_at_start_that_it_serves_no_http_api(make_server, caplog):
    # A newcomer's find: `serve --http-port off` (or a server built without an HTTP port) serves no HTTP
    # at all (curl got no answer), which the start did not say.
    with caplog.at_level(logging.INFO, logger="nlora_serve.serving.server"):
        running = make_server()
    assert caplog.messages[-1] == (f"gRPC on {running.target}; no HTTP API (--http-port off; --http-port PORT "
                                   "serves the OpenAI-compatible one)")


def test_a_metrics_port_on_the_default_http_port_names_both_flags():
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    with pytest.raises(StartupError) as err:
        serve_build._configs(parser.parse_args(["--metrics-port", "8000"]))
    assert str(err.value) == "--http-port 8000 and --metrics-port 8000: one port for two servers"


def test_the_http_api_is_on_at_vllms_port_by_default_and_off_by_name(capsys):
    # A vLLM user's `curl localhost:8000/v1/models` after a plain `serve` found nothing listening:
    # the HTTP API was off unless --http-port named a port.
    parser = argparse.ArgumentParser(prog="serve")
    serve_cli.add_serve_arguments(parser)
    assert parser.parse_args([]).http_port == 8000
    assert parser.parse_args(["--http-port", "off"]).http_port is None
    assert parser.parse_args(["--http-port", "OFF"]).http_port is None
    assert parser.parse_args(["--http-port", "0"]).http_port == 0
    for value, why in [("65536", "must be a port in [0, 65535] or 'off'; got 65536"),
                       ("-1", "must be a port in [0, 65535] or 'off'; got -1"), ("none", "invalid port value: 'none'")]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--http-port", value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"serve: error: argument --http-port: {why}"


# h130: what holds a busy port and how to move (a second `make serve` met it)
BUSY = " (another server's? stop it, or choose a free one: --metrics-port N)"
MAKE = ", or `make serve GRPC_PORT=N HTTP_PORT=M`"


def test_serve_process_with_a_busy_metrics_port_exits_2_without_noise(tmp_path):
    with _listening() as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "nlora_serve.cli", "--log-level", "WARNING", "serve", "--port", "0",
             "--http-port", "off", "--metrics-port", str(port), "--dtype", "float32", "--adapter-dir", str(tmp_path / "store"),
             "--max-model-len", "256"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == \
        f"error: cannot bind the metrics port 127.0.0.1:{port} (--metrics-port): Address already in use{BUSY}"
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag, words", [("--port", "the gRPC address"), ("--http-port", "the HTTP port"),
                                         ("--metrics-port", "the metrics port")])
def test_a_busy_port_is_refused_before_the_model_loads(tmp_path, flag, words):
    # A newcomer's find: a second `make serve` loaded the model (13 s on a busy box) before it found
    # 8000 taken. The model here does not exist: only a refusal before loading names the port.
    with _listening() as busy:
        port = busy.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", flag: str(port)}
        proc = subprocess.run(
            [sys.executable, "-m", "nlora_serve.cli", "--log-level", "WARNING", "serve", "--model",
             str(tmp_path / "no-model"), "--adapter-dir", str(tmp_path / "store"),
             *[part for item in ports.items() for part in item]],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})
    flags = "--host/--port" if flag == "--port" else flag
    assert proc.returncode == 2 and proc.stdout == ""
    busy = BUSY if flag == "--metrics-port" else BUSY.replace("--metrics-port N", f"{flag} N{MAKE}")
    assert proc.stderr == f"error: cannot bind {words} 127.0.0.1:{port} ({flags}): Address already in use{busy}\n"


def test_a_store_another_process_serves_is_refused_before_its_staging_area_is_touched(tmp_path, no_model):
    """`make serve` started twice on one --adapter-dir: each server numbered versions from its own
    view and pruned versions the other served (one was left serving a version deleted on disk), and
    each start wiped the staging area of the other's in-flight writes."""
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from nlora_serve.adapters.store import "
                               f"AdapterStore; s = AdapterStore({str(store)!r}); print('held', flush=True); "
                               "sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        in_flight = store / ".staging" / "acme.x" / "adapter_model.safetensors"
        in_flight.parent.mkdir()
        in_flight.write_bytes(b"half-written")
        for attempt in range(2):  # the serve command's early look into the store, and the store itself
            with pytest.raises(NloraError) as err:
                serve_cli.build(_args(tmp_path)) if attempt == 0 else AdapterStore(store)
            assert str(err.value).startswith(f"adapter store {store} is in use by another process"), err.value
        assert in_flight.read_bytes() == b"half-written"
    finally:
        holder.communicate("", timeout=60)
    assert AdapterStore(store).names() == []  # the holder gone, the store opens (and drops its staging area)
    assert not in_flight.exists()


def test_a_second_replica_on_the_store_is_refused_at_its_check_not_after_the_model_load(tmp_path, base_model_dir):
    """Two replicas started on one store at the same instant: the check opened the store and let
    it go, both loaded the model (~20 s), and the loser's engine was refused the store only then.
    The check's answer now holds the store's lock until the engine's store shares it."""
    import fcntl

    flags = serve_checks.check_serve_flags(_args(tmp_path, "--model", str(base_model_dir)))
    # the other replica's claim (store/lock.py): a flock on a descriptor of its own, refused while held
    fd = os.open(tmp_path / "store", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert flags.store.root == (tmp_path / "store").resolve()
