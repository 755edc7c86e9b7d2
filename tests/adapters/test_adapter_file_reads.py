"""Adapter files read from a folder (serve --adapter, the vLLM backend's pre-start check, adapters
inspect / convert / compress) are read into memory, never memory-mapped: safetensors' safe_open
maps the file, and a file truncated while mapped raised SIGBUS at the next access of a page past
its new end, which kills the process. A read of a truncated file returns fewer bytes instead."""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest

from nlora_serve.adapters.compress.report import is_plain_lora
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.errors import AdapterError

CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"
WEIGHTS = "adapter_model.safetensors"


def _mapped(path: Path) -> bool:
    """Whether ``path`` is memory-mapped in this process now (/proc/self/maps names mapped files)."""
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def test_an_adapter_folder_is_never_memory_mapped_while_it_is_read(base_fp32, tmp_path):
    """A watcher samples this process's mappings while the folder is read, over and over (the
    interpreter switching threads every microsecond): the weights file never shows among them."""
    folder = Path(shutil.copytree(CASE, tmp_path / "acme"))
    weights, stop, seen = folder / WEIGHTS, threading.Event(), []

    def watch():
        while not stop.is_set():
            if _mapped(weights):
                seen.append(True)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(40):
            read_adapter(folder, base_fp32)
            is_plain_lora(folder)
            if _mapped(weights):  # a mapping kept past the read (until garbage collected)
                seen.append(True)
    finally:
        stop.set()
        watcher.join()
        sys.setswitchinterval(interval)
    assert not seen, f"{weights} was memory-mapped {len(seen)} times while read"


@pytest.mark.parametrize("keep", [0, 5, 20, "half"])
def test_a_truncated_weights_file_is_an_error_naming_it(base_fp32, tmp_path, keep):
    folder = Path(shutil.copytree(CASE, tmp_path / "acme"))
    weights = folder / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(AdapterError, match=f"^{re.escape(str(weights))}(: | is )"):
        read_adapter(folder, base_fp32)


def test_a_weights_file_over_the_byte_cap_is_refused_before_it_is_read(base_fp32, tmp_path):
    folder = Path(shutil.copytree(CASE, tmp_path / "acme"))
    size = (folder / WEIGHTS).stat().st_size
    with pytest.raises(AdapterError, match=f"^{re.escape(str(folder / WEIGHTS))}: {size} bytes, over the "
                                           f"{size - 1} bytes an adapter's files may hold"):
        read_adapter(folder, base_fp32, max_bytes=size - 1)
    assert read_adapter(folder, base_fp32, max_bytes=size).ranks  # at the cap: read


def test_the_offline_tools_read_a_folder_of_any_size(base_fp32, tmp_path, monkeypatch):
    """The byte cap is the server's (--max-adapter-bytes bounds what tenants make it hold); inspect
    and convert read an operator's own folder whatever its size: a plain LoRA of a large model at a
    high rank exceeds 256 MiB. The read they ask for carries no cap."""
    import nlora_serve.adapters.loader as loader
    from nlora_serve.adapters.convert import convert_dir
    from nlora_serve.adapters.inspect import inspect_adapter

    folder = Path(shutil.copytree(CASE, tmp_path / "acme"))
    caps = []
    real = loader.read_file
    monkeypatch.setattr(loader, "read_file", lambda path, max_bytes: caps.append(max_bytes) or real(path, max_bytes))
    assert inspect_adapter(folder, base_fp32).num_sites > 0
    convert_dir(folder, "lora", tmp_path / "out", base_fp32)
    assert caps == [None, None]


@pytest.mark.parametrize("fname", ["adapter_config.json", WEIGHTS])
def test_a_fifo_in_place_of_a_file_is_refused_without_opening_it(base_fp32, tmp_path, fname):
    """A FIFO planted as adapter_config.json blocked its read forever (`adapters inspect`, or an
    admin's /v1/load_lora_adapter thread); each file is refused by name before it is opened. The
    read runs in a daemon thread: one blocked on the FIFO fails the join, not the suite."""
    folder = Path(shutil.copytree(CASE, tmp_path / "acme"))
    (folder / fname).unlink()
    os.mkfifo(folder / fname)
    outcome = []

    def read():
        for reader in (lambda: read_adapter(folder, base_fp32), lambda: is_plain_lora(folder)):
            try:
                reader()
                outcome.append("read")
            except AdapterError as exc:
                outcome.append(str(exc))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"blocked on the FIFO {fname}"
    if fname == WEIGHTS:  # each says what it is (read_adapter said "no adapter_model.safetensors")
        assert outcome[0] == (f"{folder / fname}: not a regular file (a FIFO, socket or device); "
                              "expected a safetensors file")
        assert outcome[1] == f"{folder / fname}: not a regular file; expected a safetensors file"
    else:  # (compress's header read does not read the config)
        assert outcome == [f"{folder / fname}: not a regular file; expected a JSON file", "read"]


@pytest.mark.parametrize("kind, said", [("folder", "a folder"), ("fifo", "a FIFO, socket or device"),
                                        ("dangling", "a link to nothing")])
def test_a_weights_name_that_is_no_file_is_named_as_what_it_is(tmp_path, kind, said):
    """It was "no adapter_model.safetensors; expected it next to adapter_config.json", beside the
    folder, FIFO or link of that very name."""
    from nlora_serve.adapters.format import WEIGHTS_NAME, weights_path

    folder = tmp_path / "acme"
    folder.mkdir()
    shutil.copy(CASE / "adapter_config.json", folder)
    weights = folder / WEIGHTS_NAME
    {"folder": weights.mkdir, "fifo": lambda: os.mkfifo(weights),
     "dangling": lambda: os.symlink(tmp_path / "gone", weights)}[kind]()
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(weights))}: not a regular file \({said}\); "
                                           "expected a safetensors file$"):
        weights_path(folder)
