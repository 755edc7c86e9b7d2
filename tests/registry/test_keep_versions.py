"""serve --keep-versions N: the store keeps a name's newest N versions (1, the default: only the
current one), and the offline history commands list and roll them back (store/history.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from nlora_serve.adapters.runtime.registry import AdapterRegistry
from nlora_serve.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from nlora_serve.adapters.store.history import list_versions, rollback
from nlora_serve.cli import main
from nlora_serve.errors import AdapterError
from test_registry import fake_load, fake_load_files, files


def _registry(root, keep: int) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), fake_load, fake_load_files, keep_versions=keep)


def _on_disk(registry: AdapterRegistry, name: str = "acme") -> list[int]:
    registry.store.wait_deleted()
    return sorted(int(p.name) for p in (registry.store.root / name).iterdir() if p.name.isdigit())


def test_the_newest_n_versions_stay_on_disk_and_a_held_older_one_until_released(tmp_path):
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    held = registry.acquire("acme")  # v1, outside the newest 3 once v4 is written
    for payload in (b"\x02", b"\x03", b"\x04"):
        registry.swap_weights("acme", payload)
    registry.register("acme", files(b"\x05"))  # an upload prunes as a swap does
    assert _on_disk(registry) == [1, 3, 4, 5]  # v2 pruned; v1 held by a request
    registry.release(held)
    assert _on_disk(registry) == [3, 4, 5]
    # a restart with a smaller N prunes to it; one without the flag keeps what the store recorded
    assert _registry(tmp_path, keep=2).rebuild() == ["acme"]
    assert _on_disk(_registry(tmp_path, keep=2)) == [4, 5]
    default = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)
    default.rebuild()
    assert _on_disk(default) == [4, 5]
    _registry(tmp_path, keep=1).rebuild()
    assert _on_disk(default) == [5]


def test_an_unloaded_name_keeps_its_newest_version_and_a_load_prunes_to_n(tmp_path):
    registry = _registry(tmp_path, keep=2)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02")
    registry.unload("acme")
    assert _on_disk(registry) == [1, 2]
    registry.register("acme", registry.store.read_files(registry.store.latest("acme").path))  # LoadAdapter
    assert _on_disk(registry) == [2, 3]


def test_a_live_rollback_is_an_upload_of_the_kept_folder(tmp_path):
    # what `adapters upload --name acme STORE/acme/00000001` sends: the folder's two files
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02")
    kept = registry.store.get("acme", 1).path
    sent = {f: (kept / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    back = registry.register("acme", sent)
    assert (back.version, back.content_hash) == (3, "01")  # the next number, v1's content
    assert registry.acquire("acme") is back  # requests admitted from now on run on it


def _sha_over(payload: bytes) -> str:
    """layout.content_hash by hand: sha256 over 'name|size\\n' + bytes per file, names sorted."""
    h = hashlib.sha256()
    for name, data in sorted(files(payload).items()):
        h.update(f"{name}|{len(data)}\n".encode() + data)
    return h.hexdigest()


def test_versions_lists_and_rollback_writes_the_old_files_as_the_next_version(tmp_path, capsys):
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02\x02")
    registry.swap_weights("acme", b"\x03")
    os.utime(tmp_path / "acme" / "00000001", (0, 86400))  # 1970-01-02 00:00:00 UTC
    (tmp_path / "acme" / "00000002" / WEIGHTS_FILE).write_bytes(b"\x09\x09")  # changed on disk since
    found = list_versions(tmp_path, "acme")
    size = len(files(b"\x01")[CONFIG_FILE]) + 1
    assert [(v.version, v.files_sha256, v.size, v.state, v.intact) for v in found] == [
        (1, _sha_over(b"\x01"), size, "kept", True), (2, _sha_over(b"\x09\x09"), size + 1, "kept", False),
        (3, _sha_over(b"\x03"), size, "current", True)]
    assert found[0].created == 86400
    assert main(["adapters", "versions", "acme", "--adapter-dir", str(tmp_path)]) == 0
    lines, first = capsys.readouterr().out.splitlines(), _sha_over(b"\x01")[:16]
    assert lines[1] == f"      1  1970-01-02 00:00:00  {first}  {size:>10}  kept"
    assert lines[2].endswith("kept (files CHANGED since written)") and lines[3].endswith("current")
    store_root = registry.store.root  # (this process holds the store's lock: another one's refusal is below)
    with pytest.raises(AdapterError, match="v3 is its current version already"):
        rollback(store_root, "acme", 3)
    with pytest.raises(AdapterError, match="has no version 7 .*: it keeps v1, v2, v3"):
        rollback(store_root, "acme", 7)
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):  # v2's files fail their sums
        rollback(store_root, "acme", 2)
    assert main(["adapters", "rollback", "acme", "--to", "1", "--adapter-dir", str(store_root)]) == 0
    assert capsys.readouterr().out.startswith("acme: v4 written with v1's files")
    assert (store_root / "acme" / "00000004" / WEIGHTS_FILE).read_bytes() == b"\x01"
    assert json.loads((store_root / "acme" / "00000004" / CONFIG_FILE).read_text()) == {"bad": False}
    again = _registry(store_root, keep=3)  # the next start serves it, and prunes to its N
    assert again.rebuild() == ["acme"] and again.get("acme").content_hash == "01"
    assert _on_disk(again) == [2, 3, 4]


def test_a_rollback_while_a_server_holds_the_store_says_how_to_roll_back_live(tmp_path):
    registry = _registry(tmp_path, keep=2)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02")
    # the lock is per process (a second store of this root in this process shares it): take it in a child
    import subprocess
    import sys
    code = (f"import sys, time; from nlora_serve.adapters.store import AdapterStore; s = AdapterStore({str(tmp_path)!r}); "
            "print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        del registry  # this process's lock released, so the child's claim holds it
        assert child.stdout.readline() == "held\n"
        with pytest.raises(AdapterError, match=r"in use by another process.*To roll back on the running server \(a "
                                               r"hot swap, as an upload\): nlora-serve adapters load --name acme "
                                               r"--version 1 \(admin key\)"):
            rollback(tmp_path, "acme", 1)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


@pytest.mark.parametrize("left", [(), (CONFIG_FILE,), (CONFIG_FILE, "SHA256SUMS")])
def test_a_rollback_to_a_version_folder_emptied_by_hand_is_refused(tmp_path, left):
    """An empty folder (or one whose weights were deleted) counted as a kept version, and the
    offline rollback wrote its nothing as the current version (b'' files, no start could serve it)."""
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    registry.register("acme", files(b"\x02"))
    emptied = tmp_path / "acme" / "00000001"
    for name in os.listdir(emptied):
        if name not in left:
            os.remove(emptied / name)
    lacks = " and ".join(f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in left)
    # adapters versions: the weights deleted beside their SHA256SUMS said "intact" (True) before
    assert list_versions(tmp_path, "acme")[0].intact is (False if "SHA256SUMS" in left else None)
    with pytest.raises(AdapterError, match=f"v1 in .* lacks {lacks} \\(a folder emptied or made by hand"):
        rollback(tmp_path, "acme", 1)
    assert sorted(os.listdir(tmp_path / "acme")) == ["00000001", "00000002"]  # nothing written


def test_versions_of_an_unknown_name_or_store_is_a_clear_error(tmp_path, capsys):
    assert main(["adapters", "versions", "acme", "--adapter-dir", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["adapters", "versions", "acme", "--adapter-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: adapter 'acme' is not in the store {tmp_path.resolve()}\n"


def test_generate_on_a_store_prunes_no_version_a_server_kept(monkeypatch, tmp_path):
    # `generate --adapter-dir STORE` only reads the store: with the default limits its start pruned
    # every version a server's --keep-versions kept to roll back to
    from nlora_serve.cli import build_parser
    from nlora_serve.serving.commands import generate

    served = _registry(tmp_path, keep=3)
    served.register("acme", files(b"\x01"))
    served.swap_weights("acme", b"\x02")
    served.swap_weights("acme", b"\x03")
    del served
    seen = {}

    def config_then_stop(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stopped before the model loads")

    monkeypatch.setattr(generate, "device_config", config_then_stop)
    args = build_parser(only="generate").parse_args(["generate", "--adapter-dir", str(tmp_path), "--prompt", "Hi"])
    with pytest.raises(RuntimeError, match="stopped before"):
        generate.run_generate(args)
    reader = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files,
                             keep_versions=seen["adapter_limits"].keep_versions)
    assert reader.rebuild() == ["acme"] and _on_disk(reader) == [1, 2, 3]


def test_serve_keep_versions_reaches_the_adapter_limits_and_zero_is_refused(capsys):
    from nlora_serve.cli import build_parser
    from nlora_serve.serving.commands.serve_checks import server_configs

    def limits(*flags):
        return server_configs(build_parser(only="serve").parse_args(["serve", *flags]))[1]

    # no flag: None, the store's recorded setting (store/settings.py)
    assert (limits().keep_versions, limits("--keep-versions", "3").keep_versions) == (None, 3)
    with pytest.raises(SystemExit):
        limits("--keep-versions", "0")
    assert "argument --keep-versions: must be an integer >= 1; got 0" in capsys.readouterr().err


def test_a_restart_with_a_smaller_n_says_which_kept_versions_it_deletes(tmp_path, caplog):
    """A restart without the --keep-versions the store was kept with (the default 1) deleted every
    version kept to roll back to, and the log said nothing: `adapters load --version` then found none
    (s29-newcomer). Now one WARNING names them and the flag; a restart that deletes nothing is silent."""
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    registry.register("globex", files(b"\x01"))
    for payload in (b"\x02", b"\x03"):
        registry.swap_weights("acme", payload)
    with caplog.at_level("WARNING", logger="nlora_serve.adapters.runtime.registry"):
        _registry(tmp_path, keep=3).rebuild()
        assert not caplog.records
        _registry(tmp_path, keep=1).rebuild()
    assert [r.getMessage() for r in caplog.records] == [
        "--keep-versions 1: deleting 2 older versions found in the adapter store: acme v1, v2 (kept by a larger "
        "--keep-versions, or held by a request when the server last stopped; the store keeps the --keep-versions N "
        "a start last gave)"]
    assert _on_disk(_registry(tmp_path, keep=1)) == [3]


def test_a_version_a_request_held_at_a_kill_is_not_blamed_on_the_flag(tmp_path, caplog):
    # the default --keep-versions 1 every time: a server killed while a request ran on a swapped-out
    # version left it on disk, and the next start's WARNING said "the adapter store kept" it and
    # told the operator to start with --keep-versions N, a flag never changed
    registry = _registry(tmp_path, keep=1)
    registry.register("acme", files(b"\x01"))
    registry.acquire("acme")  # a request on v1, never released: the server is killed
    registry.swap_weights("acme", b"\x02")
    with caplog.at_level("WARNING", logger="nlora_serve.adapters.runtime.registry"):
        _registry(tmp_path, keep=1).rebuild()
    assert [r.getMessage() for r in caplog.records] == [
        "--keep-versions 1: deleting 1 older version found in the adapter store: acme v1 (kept by a larger "
        "--keep-versions, or held by a request when the server last stopped; the store keeps the --keep-versions N "
        "a start last gave)"]


def test_versions_and_rollback_read_versions_as_large_as_the_servers_max_adapter_bytes(tmp_path, capsys):
    # both read with the default --max-adapter-bytes (256 MiB) and had no flag to change it: a server
    # started with a larger one stored versions that `adapters versions` and `adapters rollback` refused
    # ("over the server's --max-adapter-bytes 268435456"), with no way to read them
    registry = _registry(tmp_path, keep=2)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02")
    size = len(files(b"\x01")[CONFIG_FILE]) + 1  # each version's files, bytes
    common = ["--adapter-dir", str(tmp_path), "--max-adapter-bytes"]
    assert main(["adapters", "versions", "acme", *common, str(size - 1)]) == 2
    assert f"--max-adapter-bytes {size - 1}" in capsys.readouterr().err
    assert main(["adapters", "versions", "acme", *common, str(size)]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("current")
    assert main(["adapters", "rollback", "acme", "--to", "1", *common, str(size - 1)]) == 2
    assert f"--max-adapter-bytes {size - 1}" in capsys.readouterr().err
    assert main(["adapters", "rollback", "acme", "--to", "1", *common, str(size)]) == 0
    assert capsys.readouterr().out.startswith("acme: v3 written with v1's files")


def test_a_start_without_the_flag_keeps_what_the_store_recorded(tmp_path, caplog, capsys):
    """`serve --keep-versions 3` once, then `make serve` (no flag): the default 1 deleted the kept
    versions, the operator's rollback targets (s30). Now the store records the N a start gave
    (.store_settings.json); a start without the flag keeps it, only an explicit smaller N prunes."""
    from nlora_serve.adapters.store.settings import SETTINGS_FILE

    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    for payload in (b"\x02", b"\x03", b"\x04"):
        registry.swap_weights("acme", payload)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["keep_versions"] == 3
    with caplog.at_level("WARNING"):
        plain = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)  # `make serve`
        assert (plain.keep_versions, plain.rebuild()) == (3, ["acme"])
    assert _on_disk(plain) == [2, 3, 4] and not caplog.records
    plain.swap_weights("acme", b"\x05")  # and it keeps 3 while it serves
    assert _on_disk(plain) == [3, 4, 5]
    capsys.readouterr()
    assert main(["adapters", "versions", "acme", "--adapter-dir", str(tmp_path)]) == 0  # says what it keeps
    assert "the store keeps each name's newest 3 versions" in capsys.readouterr().out
    assert os.listdir(tmp_path / ".staging") == []  # the record's staging copy is gone
    failed = _registry(tmp_path, keep=2)  # a start that fails records nothing (its store as it was)
    failed.store.begin_batch()
    failed.store.abort_batch()
    assert AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files).keep_versions == 3
    smaller = _registry(tmp_path, keep=2)  # explicit: prunes, with the WARNING, and is recorded at the commit
    smaller.store.begin_batch()
    with caplog.at_level("WARNING"):
        smaller.rebuild()
    smaller.store.commit_batch()
    assert "deleting 1 older version found in the adapter store: acme v3" in caplog.text
    assert AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files).keep_versions == 2


def test_a_settings_record_not_written_by_the_store_is_refused_naming_it(tmp_path):
    from nlora_serve.adapters.store.settings import SETTINGS_FILE

    (tmp_path / SETTINGS_FILE).write_text('{"keep_versions": 0}')
    with pytest.raises(AdapterError, match=r"\.store_settings\.json is not a settings record.*'keep_versions'"):
        AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)


def test_a_rollback_that_loses_a_race_is_a_retryable_conflict_not_not_found(tmp_path):
    """LoadAdapter with a version whose folder another admin's upload pruned between the listing
    and the read answered NOT_FOUND "...; retry": a client does not retry a NOT_FOUND. Now ABORTED
    (HTTP 409), gRPC's code for a concurrency conflict, as RequestAborted's conflicts are."""
    import grpc

    from nlora_serve.adapters.runtime.version import ConcurrentChange
    from nlora_serve.adapters.store import StoredVersion
    from nlora_serve.serving.grpc_api.admin import _load_stored
    from nlora_serve.serving.status import http_status_of, status_of

    registry = _registry(tmp_path, keep=2)
    registry.register("acme", files(b"\x01"))

    class Manager:  # what _load_stored uses of an AdapterManager
        def __init__(self):
            self.registry = registry

        def versions(self):
            return registry.versions()

    gone = StoredVersion("acme", 7, tmp_path / "acme" / "00000007")  # pruned since it was listed
    with pytest.raises(ConcurrentChange, match=r"v7: its stored files were removed meanwhile .*; retry") as raised:
        _load_stored(Manager(), gone, rollback=True)
    assert (status_of(raised.value), http_status_of(raised.value)) == ((grpc.StatusCode.ABORTED, "aborted"),
                                                                       (409, "aborted"))


def test_an_upload_or_swap_of_the_current_content_writes_no_version(tmp_path, caplog):
    """A re-upload (a deploy script run twice) or a swap to the weights already served wrote a new
    version each time: with --keep-versions 3, two such retries pushed out both real rollback
    targets (s30). Now the same content hash is the current version: no folder, logged."""
    registry = _registry(tmp_path, keep=3)
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02")
    held = registry.acquire("acme")  # a request running on v2 keeps running on it
    with caplog.at_level("INFO", logger="nlora_serve.adapters.runtime.registry"):
        again = registry.register("acme", files(b"\x02"))
        swapped = registry.swap_weights("acme", b"\x02", if_version=2)
    assert again is swapped is held and (again.version, again.current) == (2, True)
    assert "the new content is v2's" in caplog.text and _on_disk(registry) == [1, 2]
    assert registry.register("acme", files(b"\x03")).version == 3  # other content: a new version as before
    registry.release(held)
    assert _on_disk(registry) == [1, 2, 3]
