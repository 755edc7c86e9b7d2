"""``serve`` and ``generate`` from start to exit: what they say before the imports that take
seconds, what they refuse before loading the model, the start-up heap frozen while serving."""

import json
import logging
import re
import subprocess
import sys

import pytest


# Each nlora_serve log record as it is emitted, with whether torch was imported by then.
FIRST_LINE = """
import logging, sys
from nlora_serve.cli import main

class Seen(logging.Handler):
    def emit(self, record):
        print("REC", record.levelname, record.name, record.getMessage(), "torch" in sys.modules, sep="\\t")

logging.getLogger("nlora_serve").addHandler(Seen())
try:
    main({argv!r})
except SystemExit:
    pass
print("END", "torch" in sys.modules, sep="\\t")
"""
SERVE_LOADS = "starting: loading torch, the engine and the gRPC and HTTP front ends..."
GENERATE_LOADS = "starting: loading torch and the engine..."


# runs refused after the imports: generate's by a model that does not exist, serve's (which resolves
# --model before them) by a device no torch has
NO_MODEL = ["--model", "{tmp}/no-model"]
SERVE_NO_MODEL = ["serve", "--port", "0", "--http-port", "0", "--adapter-dir", "{tmp}/store", "--model", "{model}",
                  "--device", "tpu"]


@pytest.mark.parametrize("argv, first, loads_torch", [
    (SERVE_NO_MODEL, ("nlora_serve.serve", SERVE_LOADS), True),
    (["generate", "--message", "Hi", *NO_MODEL], ("nlora_serve.generate", GENERATE_LOADS), True),
    (["--log-level", "WARNING", *SERVE_NO_MODEL], None, True),
    (["--log-level=ERROR", "generate", "--message", "Hi", *NO_MODEL], None, True),
    (["serve", "--help"], None, False),
    (["serve", "--no-such-flag"], None, False),  # argparse's error at once, not "starting: loading ..." first
    # refused by the checks that need no torch, before the imports and so without "starting: loading ..."
    (["serve", "--port", "8000"], None, False),  # two servers on one port (--http-port's default)
    (["serve", "--port", "0", "--http-port", "0", "--adapter-dir", "{tmp}/store", *NO_MODEL], None, False),
    (["generate", "--message", "Hi", "--max-num-seqs", "0"], None, False),
])
def test_serve_and_generate_say_what_they_load_before_the_imports_that_take_seconds(argv, first, loads_torch,
                                                                                     tmp_path, base_model_dir):
    # A newcomer's find (h76): `serve` and `generate` import torch, the engine (and serve's front ends),
    # 5-13 s on a loaded 2-core machine with nothing on the screen. Their first line comes before those
    # imports (torch not yet in sys.modules when it is emitted; it is by the end), at the level
    # --log-level allows, and never with --help or a flag argparse refuses (h80: those load no torch),
    # nor for a start refused by a check that needs no torch (h110: `serve --port 8000` said
    # "starting: loading ..." and took 3 s of imports to refuse a flag, now 0.15 s without torch).
    argv = [arg.format(tmp=tmp_path, model=base_model_dir) for arg in argv]
    done = subprocess.run([sys.executable, "-c", FIRST_LINE.format(argv=argv)], capture_output=True, text=True,
                          timeout=300, check=True)
    lines = done.stdout.splitlines()
    records = [line.split("\t")[1:] for line in lines if line.startswith("REC\t")]
    assert lines[-1] == f"END\t{loads_torch}", done.stderr
    starting = [r for r in records if r[2].startswith("starting:")]
    if first is None:
        assert starting == [] and "starting:" not in done.stderr
    else:
        name, message = first
        assert records[0] == ["INFO", name, message, "False"], records
        assert starting == [records[0]]
        # serve's lines start with the UTC time (an operator reads its log later), generate's do not
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z " if name == "nlora_serve.serve" else ""
        assert re.fullmatch(stamp + re.escape(f"INFO {name}: {message}"), done.stderr.splitlines()[0]), done.stderr


@pytest.mark.parametrize("flags, warned", [
    (["--port", "8001"], True),
    (["--port=8001"], True),
    (["--port", "8001", "--http-port", "8002"], False),
    (["--port", "8001", "--http-port", "off"], False),
    (["--http-port", "8002"], False),
])
def test_serve_port_without_http_port_says_where_the_http_api_stays(caplog, capsys, flags, warned):
    # A newcomer's find (h76): `serve --port 8001`, as vLLM's HTTP port, put gRPC on 8001; the OpenAI
    # client sent there said only "Connection error." (curl: "Received HTTP/0.9"). --max-queue 0 ends
    # the start before the model loads.
    from nlora_serve.cli import main as cli_main

    with caplog.at_level(logging.WARNING, logger="nlora_serve"):
        assert cli_main(["serve", *flags, "--max-queue", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-queue 0")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    want = ("--port 8001 is the gRPC port here; the OpenAI-compatible HTTP API stays on --http-port 8000 (vLLM's "
            "--port is its HTTP port: here --http-port)")
    assert messages == ([want] if warned else [])


def test_generate_on_a_store_another_process_holds_is_refused_before_torch_loads(tmp_path):
    # A newcomer's find (h76): `generate --adapter lower --adapter-dir nlora-adapters` beside `make serve`
    # loaded the model and started the engine (12 s under load) before saying the store was in use;
    # then (s29) still after importing torch and the engine (3-8 s): now the flag check refuses it
    import fcntl
    import os

    store = tmp_path / "store"
    (store / "lower" / "00000002").mkdir(parents=True)  # a server's stored versions of 'lower'
    (store / "lower" / "00000010").mkdir()
    argv = ["generate", "--message", "Hi", "--adapter", "lower", "--adapter-dir", str(store)]
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)  # this process is the server holding it (store/lock.py)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, "-c", FIRST_LINE.format(argv=argv)], capture_output=True, text=True,
                              timeout=60, check=True)
    finally:
        os.close(fd)
    lines = done.stdout.splitlines()
    assert lines[-1] == "END\tFalse", done.stderr  # refused before torch was imported
    assert not [line for line in lines if line.startswith("REC\t")], lines  # no "starting: loading ...", no model
    err = done.stderr
    assert err.startswith(f"error: adapter store {store.resolve()} is in use by another process"), err
    # h141: it said only "give each server its own --adapter-dir"; generate can read the stored folder itself
    assert err.rstrip("\n").endswith("; to generate with 'lower' while the server runs, give its stored folder "
                                      f"without --adapter-dir: --adapter {store / 'lower' / '00000010'}"), err


def test_generate_with_a_max_model_len_over_the_models_positions_is_one_error_line(capsys, base_model_dir):
    # It ended in a ValueError traceback naming SchedulerConfig.max_model_len.
    from nlora_serve.cli import main as cli_main

    limit = json.loads((base_model_dir / "config.json").read_text())["max_position_embeddings"]
    over = limit + 1
    assert cli_main(["generate", "--message", "Hi", "--dtype", "float32", "--max-model-len", str(over)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: --max-model-len {over}: exceeds the model's max_position_embeddings {limit} "
                       f"({base_model_dir / 'config.json'})")


def test_serve_freezes_the_start_up_heap_before_it_serves(monkeypatch):
    """``run_serve`` moves what start-up made out of the collector's reach before the first
    request (a full collection walked ~340k objects, every stream stalled: bench/gc_pause.py)."""
    import argparse
    import gc

    from nlora_serve.serving.commands import serve as serve_cli

    seen = {}

    class Engine:
        dead_reason = None

        def shutdown(self):
            seen["shut down"] = True

    async def serving(server, examples, batch):
        seen["frozen while serving"] = gc.get_freeze_count()
        return True

    monkeypatch.setattr(serve_cli, "build", lambda args, flags: (Engine(), object(), [], None))
    monkeypatch.setattr(serve_cli, "serve", serving)
    gc.unfreeze()  # what the suite froze after earlier modules (tests/conftest.py)
    assert gc.get_freeze_count() == 0
    try:
        assert serve_cli.run_serve(argparse.Namespace(backend="vllm")) == 0
    finally:
        gc.unfreeze()
    assert seen["frozen while serving"] > 1000 and seen["shut down"]


LOWER = "examples/tenants/lower"


def _start_refusal(capsys, tmp_path, adapter: str) -> str:
    """``serve --adapter ADAPTER`` with a --model that does not exist: the start's ``error:`` line
    (the model's refusal when nothing before it refused the --adapter)."""
    from nlora_serve.cli import main as cli_main

    argv = ["serve", "--port", "0", "--http-port", "0", "--adapter-dir", str(tmp_path / "store"),
            "--adapter", adapter, "--model", str(tmp_path / "no-model")]
    assert cli_main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("folder, why", [
    ("{tmp}/nonexistent", "{tmp}/nonexistent: no such adapter directory"),
    ("examples/tenants", "examples/tenants: no adapter_config.json;"),  # the folder above the adapter
    (LOWER + "/adapter_config.json", LOWER + "/adapter_config.json: is a file, not an adapter directory"),
])
def test_serve_adapter_folder_that_cannot_serve_is_refused_before_the_model_loads(capsys, tmp_path, folder, why):
    # A newcomer's find (h117): `serve --adapter x=/nonexistent` loaded torch, the model and the engine
    # (~5 s, 12 s under load) before naming the folder; the model's refusal here shows how far it got.
    folder, why = folder.format(tmp=tmp_path), why.format(tmp=tmp_path)
    assert _start_refusal(capsys, tmp_path, f"x={folder}").startswith(f"error: --adapter x={folder}: {why}")


@pytest.mark.parametrize("unloaded", [True, False])
def test_serve_adapter_folder_of_a_name_the_store_holds(capsys, tmp_path, unloaded):
    # The store holds `x`: served again at start, where a start reads the --adapter folder to compare
    # weights (refused when missing, as before, now before the model); unloaded by an operator, the
    # start never reads it and leaves the name unloaded (AdapterManager.start_names): no refusal.
    from pathlib import Path

    from nlora_serve.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    store.write("x", {f.name: f.read_bytes() for f in Path(LOWER).iterdir()})
    if unloaded:
        store.mark_unloaded("x")
    del store
    missing = tmp_path / "moved-away"
    err = _start_refusal(capsys, tmp_path, f"x={missing}")
    if unloaded:
        assert not err.startswith("error: --adapter") and str(tmp_path / "no-model") in err, err
    else:
        assert err.startswith(f"error: --adapter x={missing}: {missing}: no such adapter directory"), err


@pytest.mark.parametrize("folder, why", [
    ("{tmp}/nonexistent", "no such adapter directory"),  # h130: a mistyped path got the by-name hint below
    ("lowr", "not a directory; to use a stored adapter by name, give its store with --adapter-dir"),
    ("README.md", "is a file, not an adapter directory"),
    ("examples/tenants", "examples/tenants: no adapter_config.json;"),
])
def test_generate_adapter_folder_that_cannot_serve_is_refused_before_torch_loads(capsys, caplog, tmp_path, folder,
                                                                                   why):
    # h117: `generate --adapter /nonexistent` imported torch and the engine first (6.8 s on a 2-core box);
    # a folder without adapter_config.json was refused only once the model and engine had loaded
    from nlora_serve.cli import main as cli_main

    folder = folder.format(tmp=tmp_path)
    with caplog.at_level(logging.INFO, logger="nlora_serve"):
        assert cli_main(["generate", "--message", "Hi", "--adapter", folder]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --adapter {folder}: {why}")
    assert not [r for r in caplog.records if r.getMessage().startswith("starting:")]


def test_serve_adapter_folder_the_store_serves_otherwise_warns_with_the_command_to_serve_it_again(caplog):
    # h141: after the README's `adapters swap --name lower <signature's N>`, a restart of `make serve`
    # warned "`adapters swap` the folder's N": which file, to which name, and a LoRA folder has no N
    # to swap. The warning now prints the upload that serves the folder again (any flavour).
    from types import SimpleNamespace

    from nlora_serve.serving.commands.serve_build import _register_named

    class Adapters:
        def start_names(self, names):
            return []  # the store serves every name already

        def served_instead(self, name, folder):
            return SimpleNamespace(version=4)

        def versions(self):
            return [SimpleNamespace(name="lower")]

    with caplog.at_level(logging.WARNING, logger="nlora_serve"):
        served = _register_named(SimpleNamespace(adapters=Adapters()), [("lower", "examples/tenants/lower")],
                                 "nlora-adapters")
    assert served == ["lower"]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line == ("--adapter lower=examples/tenants/lower: the adapter store nlora-adapters already holds 'lower', "
                    "with other weights (swapped or uploaded since); serving lower v4 instead of that folder (to "
                    "serve the folder again, once the server is up: `nlora-serve adapters upload --name lower "
                    "examples/tenants/lower`; or start with a fresh --adapter-dir)")
