"""Offline tools' output is all or nothing: a write that fails part-way (here a real EFBIG from a
file-size limit, the same path as a full disk) leaves none of the command's files or folders, and
what was in an existing folder stays. Before: a traceback (SafetensorError escaped) and the
half-written output stayed (a hostile tester's find, round two session 13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nlora_serve.adapters.cli import main
from nlora_serve.adapters.family import factors_bytes, make_factors
from nlora_serve.adapters.writing import Undo, check_out_dir, write_dir
from nlora_serve.errors import AdapterError

REPO = Path(__file__).parents[2]


def _run_with_file_size_limit(code: str, limit: int) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose writes fail with EFBIG past ``limit`` bytes a file.
    The interpreter sets the limit itself, first: a ``preexec_fn`` would make subprocess fork this
    process, whose gRPC threads (other tests' servers) then break the child."""
    limited = ("import resource, signal\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", limited + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_failed_write_into_a_new_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "a" / "b" / "adapter"
    done = _run_with_file_size_limit(f"""
        import torch
        from nlora_serve.adapters.writing import write_dir
        from nlora_serve.errors import AdapterError
        try:
            write_dir({str(out)!r}, {{"r": 4}}, {{"x": torch.zeros(65536)}})  # 256 KiB
        except AdapterError as exc:
            print("refused:", exc)
        """, limit=64 * 1024)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and str(out) in done.stdout and "File too large" in done.stdout
    assert _tree(tmp_path) == []  # a/ and a/b/ were created by the write: removed with it


def test_a_failed_write_into_an_existing_folder_keeps_what_was_there(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "train.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
    done = _run_with_file_size_limit(f"""
        import torch
        from nlora_serve.adapters.writing import write_dir
        from nlora_serve.errors import AdapterError
        try:
            write_dir({str(out)!r}, {{"r": 4}}, {{"x": torch.zeros(65536)}})
        except AdapterError as exc:
            print("refused:", exc)
        """, limit=64 * 1024)
    assert "refused:" in done.stdout, done.stderr
    assert _tree(tmp_path) == ["work", "work/train.jsonl"]  # no adapter file, no temp file
    assert (out / "train.jsonl").read_text().startswith('{"prompt"')


def test_a_family_whose_member_fails_to_write_leaves_no_factors(tmp_path):
    # the factors (A_f, B_f) fit under the limit, the full-form member (A_f, B_f and N) does not:
    # the member's failure must take the factors written before it away again
    sites = {(0, "q_proj"): (torch.randn(4, 4096), torch.randn(4096, 4))}
    limit = len(factors_bytes(make_factors(sites, "fp"))) + 32  # a member is at least 64 bytes of N larger
    out = tmp_path / "family"
    done = _run_with_file_size_limit(f"""
        import torch
        from nlora_serve.adapters.compress.build import CompressedFamily, write_family
        from nlora_serve.adapters.family import make_factors
        from nlora_serve.errors import AdapterError
        torch.manual_seed(0)
        sites = {{(0, "q_proj"): (torch.randn(4, 4096), torch.randn(4096, 4))}}
        members = {{name: {{(0, "q_proj"): torch.eye(4)}} for name in ("m1", "m2")}}
        family = CompressedFamily(make_factors(sites, "fp"), members, {{}})
        try:
            write_family({str(out)!r}, family, full=True)
        except AdapterError as exc:
            print("refused:", exc)
        """, limit=limit)
    assert "refused:" in done.stdout and "File too large" in done.stdout, done.stderr
    assert not out.exists()


def test_undo_removes_what_it_recorded_and_only_that(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    with pytest.raises(RuntimeError), Undo() as undo:
        write_dir(kept / "one", {"r": 1}, {"x": torch.ones(2)}, undo=undo)
        write_dir(tmp_path / "new" / "two", {"r": 1}, {"x": torch.ones(2)}, undo=undo)
        assert _tree(tmp_path) == ["kept", "kept/mine.txt", "kept/one", "kept/one/adapter_config.json",
                                   "kept/one/adapter_model.safetensors", "new", "new/two",
                                   "new/two/adapter_config.json", "new/two/adapter_model.safetensors"]
        raise RuntimeError("a later step of the command fails")
    assert _tree(tmp_path) == ["kept", "kept/mine.txt"]


def _a_dangling_link(tmp: Path) -> Path:
    os.symlink(tmp / "gone", tmp / "out")
    return tmp / "out"


def _a_file(tmp: Path) -> Path:
    (tmp / "out").write_text("x")
    return tmp / "out"


def _under_a_file(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f" / "out"


def _holding_a_config(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "adapter_config.json").write_text("{}")
    return tmp / "out"


def _holding_a_dangling_link(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    os.symlink(tmp / "gone", tmp / "out" / "adapter_model.safetensors")
    return tmp / "out"


@pytest.mark.parametrize("setup, words", [(_a_file, "is a file, not a folder"),
                                          (_a_dangling_link, "is a link to nothing, not a folder"),
                                          (_under_a_file, "f is a file, not a folder"),
                                          (_holding_a_config, "already holds an adapter"),
                                          (_holding_a_dangling_link, "already holds an adapter")])
def test_check_out_dir_names_what_is_wrong(tmp_path, setup, words):
    target = setup(tmp_path)
    with pytest.raises(AdapterError, match=words) as info:
        check_out_dir(target, "--out")
    assert f"--out {target}" in str(info.value)


def test_tune_refuses_one_folder_for_both_forms_before_loading_anything(tmp_path, capsys):
    # before: the tied form was written after training, then the full form refused (exit 2, --out left)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    out = tmp_path / "out"
    assert main(["tune", "--data", str(data), "--out", str(out), "--also-full-form", str(out) + "/"]) == 2
    assert "name one folder" in capsys.readouterr().err and not out.exists()
    (tmp_path / "taken").write_text("x")
    assert main(["tune", "--data", str(data), "--out", str(out), "--also-full-form", str(tmp_path / "taken")]) == 2
    assert "--also-full-form" in capsys.readouterr().err and not out.exists()


def test_a_rollback_keeps_what_another_writer_put_in_a_folder_it_created(tmp_path):
    # two `compress` runs into one new --out: the loser's rollback removed the folder whole, and with
    # it the winner's finished family
    with pytest.raises(RuntimeError), Undo() as undo:
        write_dir(tmp_path / "new" / "mine", {"r": 1}, {"x": torch.ones(2)}, undo=undo)
        (tmp_path / "new" / "theirs").mkdir()
        (tmp_path / "new" / "theirs" / "adapter_config.json").write_text("{}")
        raise RuntimeError("this command fails after another wrote into its new folder")
    assert _tree(tmp_path) == ["new", "new/theirs", "new/theirs/adapter_config.json"]


def test_a_file_another_writer_puts_in_place_first_is_never_overwritten(tmp_path, monkeypatch):
    # check_out_dir runs before the write: a writer racing in between must not be clobbered
    import nlora_serve.adapters.writing as writing

    out = tmp_path / "out"
    real = writing.save_file

    def racing(data, path, metadata=None):
        out.joinpath("adapter_model.safetensors").write_text("theirs")  # lands between check and place
        real(data, path, metadata=metadata)

    monkeypatch.setattr(writing, "save_file", racing)
    with pytest.raises(AdapterError, match="cannot write the adapter"):
        write_dir(out, {"r": 1}, {"x": torch.ones(2)})
    assert out.joinpath("adapter_model.safetensors").read_text() == "theirs"
    assert _tree(tmp_path) == ["out", "out/adapter_model.safetensors"]  # no config, no temp file of ours


def test_an_out_folder_inside_an_adapter_store_is_refused(tmp_path):
    """`adapters convert --out STORE/acme/00000099` (or through a link into the store) wrote a folder
    the next start served as acme's current version, no one having registered it, and --keep-versions
    then deleted an older kept version to make room (a hostile tester's find, session 30)."""
    from nlora_serve.adapters.store import AdapterStore

    root = tmp_path / "store"
    store = AdapterStore(root)
    store.write("acme", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x00" * 8})
    (root / "acme" / "00000099").mkdir()
    assert store.versions("acme") == [1, 99]  # what a folder written there becomes
    (root / "acme" / "00000099").rmdir()
    (tmp_path / "link").symlink_to(root / "acme")
    for out in (root / "acme" / "00000099", root / "new", root, tmp_path / "link" / "00000002"):
        with pytest.raises(AdapterError, match=rf"^--out {out} is inside the adapter store {root} .* then "
                                               "`nlora-serve adapters upload`$"):
            check_out_dir(out)
    check_out_dir(tmp_path / "elsewhere" / "acme")  # beside the store: fine
