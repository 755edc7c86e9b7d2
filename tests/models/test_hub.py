"""Hugging Face names (ORG/NAME) resolve through a Hugging Face cache folder the test builds itself,
in the hub's layout (models--ORG--NAME/refs/main, snapshots/<commit>/...); nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from nlora_serve.errors import ModelError
from nlora_serve.models import resolve_model

CASES = Path(__file__).parents[1] / "data" / "cases"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(hub: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` as the main revision of ``repo_id`` in the hub cache ``hub``, as `hf download`
    leaves them (blobs linked from the snapshot); returns the snapshot folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def _tiny_llama(tmp_path: Path) -> dict[str, bytes]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 32}
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8)}, str(tmp_path / "w.safetensors"))
    return {"config.json": json.dumps(config).encode(), "model.safetensors": (tmp_path / "w.safetensors").read_bytes()}


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_a_model_name_resolves_to_its_cached_snapshot(tmp_path, monkeypatch, variable):
    root = tmp_path / "hf"
    hub = root / "hub" if variable == "HF_HOME" else root
    snapshot = _cached_repo(hub, "acme-org/tiny-llama", _tiny_llama(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder "acme-org/tiny-llama"
    assert resolve_model("acme-org/tiny-llama", tmp_path / "cache") == snapshot.resolve()


def test_a_missing_name_says_how_to_fetch_it_and_a_local_folder_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model("acme-org/absent", tmp_path / "cache")
    assert "`hf download acme-org/absent`" in str(err.value) and str(tmp_path / "hf" / "hub") in str(err.value)
    local = tmp_path / "acme-org" / "absent"  # the same spelling as a local path: that one is used
    local.mkdir(parents=True)
    for name, data in _tiny_llama(tmp_path).items():
        (local / name).write_bytes(data)
    assert resolve_model("acme-org/absent", tmp_path / "cache") == local.resolve()


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nlora_serve.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_adapter_names_resolve_in_the_cli_and_a_file_is_not_a_directory(tmp_path):
    import os

    hub = tmp_path / "hf" / "hub"
    tenant = CASES / "inttune-nystrom-tied"
    _cached_repo(hub, "acme-org/tenant", {f.name: f.read_bytes() for f in tenant.iterdir() if f.is_file()})
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).parents[2]))
    env.pop("HF_HUB_CACHE", None)
    done = _cli("adapters", "inspect", "acme-org/tenant", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ref = _cli("adapters", "inspect", str(tenant), "--json", env=env, cwd=tmp_path)
    assert json.loads(done.stdout)["content_hash"] == json.loads(ref.stdout)["content_hash"]
    missing = _cli("adapters", "inspect", "acme-org/nope", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "`hf download acme-org/nope`" in missing.stderr
    shutil.copy(Path(__file__).parents[2] / "README.md", tmp_path / "README.md")
    a_file = _cli("adapters", "inspect", "README.md", env=env, cwd=tmp_path)
    assert a_file.returncode == 2 and "README.md: is a file, not an adapter directory" in a_file.stderr


def test_serve_registers_an_adapter_given_by_its_hub_name(tmp_path, monkeypatch):
    import argparse

    from nlora_serve.adapters.loader import read_adapter
    from nlora_serve.serving.commands import serve as serve_cli

    tenant = CASES / "inttune-nystrom-tied"
    snapshot = _cached_repo(tmp_path / "hf" / "hub", "acme-org/tenant",
                            {f.name: f.read_bytes() for f in tenant.iterdir() if f.is_file()})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    args = parser.parse_args(["--port", "0", "--http-port", "0", "--dtype", "float32", "--adapter-dir", str(tmp_path / "store"),
                              "--adapter", "acme=acme-org/tenant"])
    engine, _, names, batch = serve_cli.build(args)
    batch.commit()
    try:
        assert names == ["acme"]
        served = {v.name: v for v in engine.adapters.versions()}["acme"]
        assert served.content_hash == read_adapter(snapshot, engine.adapters.base).content_hash
        assert served.content_hash == read_adapter(tenant, engine.adapters.base).content_hash
    finally:
        engine.shutdown()
