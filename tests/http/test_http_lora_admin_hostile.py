"""vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter under hostile input: adapter files
that are no regular files, paths the system cannot look up, concurrent loads of one new name, and
the base model's name given to unload. Each refusal in OpenAI's error shape, nothing served or
stored by it, and the server loading a good folder afterwards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading

import pytest
import requests

from grpc_harness import ADMIN_KEY
from http_harness import CASES

CASE = "inttune-nystrom-tied"  # tests/data/cases: a tied IntTune tenant
NAME = "inttune-loaded"


def _post(server, path: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{server.server.http_port}{path}", data=json.dumps(body), timeout=timeout,
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_KEY}"})


def _load(server, path, name: str = NAME, timeout: float = 60, **fields) -> requests.Response:
    return _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **fields}, timeout)


def _error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def _served(server) -> dict[str, int]:
    return {v.name: v.version for v in server.engine.adapters.versions()}


@pytest.fixture
def server(make_http_server):
    return make_http_server(allow_runtime_lora_updating=True)


def _release_readers(folder) -> None:
    """Give EOF to a reader blocked on a FIFO of ``folder`` (the server before the fix), so that a
    failing test still stops its server."""
    for entry in folder.iterdir():
        if entry.is_fifo():
            try:
                os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:  # ENXIO: no reader, as it should be
                assert exc.errno == errno.ENXIO


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_an_adapter_file_that_is_no_regular_file_is_refused_unread(server, tmp_path, file, kind):
    # a FIFO blocked the worker thread for good (the request never answered); a link to /dev/zero
    # (not run here: it reads until memory runs out) or /dev/null was read as the config
    folder = shutil.copytree(CASES / CASE, tmp_path / "adapter")
    (folder / file).unlink()
    if kind == "fifo":
        os.mkfifo(folder / file)
    elif kind == "device":
        (folder / file).symlink_to("/dev/null")
    else:
        (folder / file).mkdir()
    what = {"fifo": "a FIFO", "device": "a device or socket", "folder": "a folder"}[kind]
    try:
        error = _error(_load(server, folder, timeout=20), 400)
    finally:
        _release_readers(folder)
    assert error["message"] == (f"{folder}: {file} is {what}, not a regular file; an adapter folder holds "
                                "adapter_config.json and adapter_model.safetensors as files (or links to files)")
    assert _served(server) == {} and server.engine.adapters.registry.store.latest(NAME) is None
    linked = tmp_path / "linked"  # links to regular files are an adapter folder as any other
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(CASES / CASE / name)
    assert _load(server, linked).status_code == 200
    assert _served(server) == {NAME: 1}


@pytest.mark.parametrize("path", ["/tmp/" + "a" * 300, "a" * 100_000, "org" + "a" * 300 + "/name"])
def test_a_path_too_long_to_look_up_is_404_not_a_500(server, path):
    # Path.is_dir (and exists, for an ORG/NAME-like path) raised ENAMETOOLONG: a bare 500
    error = _error(_load(server, path), 404)
    shown = path if len(path) <= 200 else path[:200] + "..."  # errors.shown
    assert (error["message"], error["code"]) == (f"lora_path {shown!r}: no such folder on the server "
                                                 "(File name too long)", "not_found")
    assert _load(server, CASES / CASE).status_code == 200


def test_concurrent_loads_of_one_new_name_register_it_once(server):
    # each passed the "already loaded" check before any had registered: all answered 200 and the
    # name ended at version 4, three of them loaded in place without load_inplace
    answers, start = [], threading.Barrier(4)

    def load():
        start.wait()
        answers.append(_load(server, CASES / CASE))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(resp.status_code for resp in answers) == [200, 400, 400, 400], [r.text for r in answers]
    for resp in answers:
        if resp.status_code == 400:
            assert resp.json()["error"]["message"] == (f"the lora adapter {NAME!r} has already been loaded; to load a "
                                                       "new version in place, set 'load_inplace' to true")
    assert _served(server) == {NAME: 1}
    assert server.engine.adapters.registry.store.latest(NAME).version == 1
    # in place with the same folder: the current content, so the current version is answered (no new one)
    assert _load(server, CASES / CASE, load_inplace=True).status_code == 200 and _served(server) == {NAME: 1}


def test_unloading_the_base_models_name_is_404_as_any_name_not_served(server):
    # it answered 400 telling the operator to "register it under another name"
    base = server.server.generation.info.model
    error = _error(_post(server, "/v1/unload_lora_adapter", {"lora_name": base}), 404)
    assert error["message"] == f"adapter {base!r} is not registered"


@pytest.mark.parametrize("given, said", [
    ("", "lora_path is empty; expected the path of an adapter folder on the server"),
    (str(CASES / CASE / "adapter_model.safetensors"),
     f"lora_path '{CASES / CASE / 'adapter_model.safetensors'}' is a file; expected the adapter folder that holds "
     f"adapter_config.json and adapter_model.safetensors ('{CASES / CASE}'?)"),
])
def test_an_empty_lora_path_or_a_file_for_the_folder_is_named_before_anything_is_read(given, said):
    """"" read as ".", the server's working folder ("no adapter_config.json"); the folder's own
    adapter_model.safetensors was "no such folder on the server" (a 404, for a file that is there).
    Both are refused before the server is asked for anything (no ctx needed): a 400 naming lora_path."""
    from nlora_serve.errors import AdapterError
    from nlora_serve.serving.http_api.lora_admin import _register

    with pytest.raises(AdapterError) as err:
        _register(None, NAME, given, None)
    assert str(err.value) == said
