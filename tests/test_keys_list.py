"""``nlora-serve keys list``: a tenants file's keys, tenants, grants and quotas, read with the server's
own parser; never a key nor its sha256."""

from __future__ import annotations

import hashlib
import json

import pytest

from nlora_serve.cli import main
from nlora_serve.serving.auth import AuthError, Authenticator


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


DOC = {"admin_keys": [{"name": "ops", "key_sha256": _sha("k-ops")}],
       "tenants": [{"name": "acme", "key_sha256": _sha("k-acme-1"), "adapters": ["acme", "acme-*"],
                    "base_model": True, "weight": 2, "max_concurrent_requests": 8},
                   {"name": "acme", "key_sha256": _sha("k-acme-2"), "adapters": ["acme", "acme-*"],
                    "base_model": True, "weight": 2, "max_concurrent_requests": 8},  # a rotation: two keys
                   {"name": "globex", "key_sha256": _sha("k-globex"), "adapters": ["globex\x1b[2J"]}]}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["keys", "list", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_list_prints_each_key_its_tenant_grants_and_quota_never_the_key_or_hash(tmp_path, capsys):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(DOC))
    code, out, _ = _run(capsys, "--tenants-file", str(path), "--json")
    assert code == 0
    assert json.loads(out) == [  # the file's order, admin_keys first; ids by hand: sha256's first 8 hex digits
        {"key_id": _sha("k-ops")[:8], "name": "ops", "role": "admin", "adapters": ["*"], "base_model": True,
         "weight": 1.0, "max_concurrent_requests": None},
        {"key_id": _sha("k-acme-1")[:8], "name": "acme", "role": "tenant", "adapters": ["acme", "acme-*"],
         "base_model": True, "weight": 2.0, "max_concurrent_requests": 8},
        {"key_id": _sha("k-acme-2")[:8], "name": "acme", "role": "tenant", "adapters": ["acme", "acme-*"],
         "base_model": True, "weight": 2.0, "max_concurrent_requests": 8},
        {"key_id": _sha("k-globex")[:8], "name": "globex", "role": "tenant", "adapters": ["globex\x1b[2J"],
         "base_model": False, "weight": 1.0, "max_concurrent_requests": None}]
    code, table, _ = _run(capsys, "--tenants-file", str(path))
    assert code == 0
    ids = [_sha(k)[:8] for k in ("k-ops", "k-acme-1", "k-acme-2", "k-globex")]
    assert table.splitlines() == [
        "KEY_ID    NAME    ROLE    ADAPTERS       BASE_MODEL  WEIGHT  MAX_CONCURRENT",
        f"{ids[0]}  ops     admin   *              yes         1       -",
        f"{ids[1]}  acme    tenant  acme,acme-*    yes         2       8",
        f"{ids[2]}  acme    tenant  acme,acme-*    yes         2       8",
        f"{ids[3]}  globex  tenant  globex\\x1b[2J  no          1       -"]  # a control character escaped
    for secret in ("k-ops", "k-acme-1", "k-globex", *(_sha(k)[8:] for k in ("k-ops", "k-acme-1", "k-globex"))):
        assert secret not in out + table


def test_keys_list_reads_toml_as_the_server_does(tmp_path, capsys):
    path = tmp_path / "tenants.toml"
    path.write_text(f'[[tenants]]\nname = "acme"\nkey_sha256 = "{_sha("k")}"\nadapters = ["acme"]\n')
    code, out, _ = _run(capsys, "--tenants-file", str(path), "--json")
    assert code == 0 and [(r["name"], r["adapters"]) for r in json.loads(out)] == [("acme", ["acme"])]


@pytest.mark.parametrize("text", [
    '{"tenants": [{"name": "x", "key_sha256": "abc"}]}',  # a short hash
    '{"tenants": [{"name": "x", "key": "nls_s3cret"}]}',  # a plaintext key
    '{"tenants": []}',  # no key at all
    '{"tenant": []}',  # a typo'd section
    "{not json"])
def test_a_file_the_server_refuses_is_refused_with_the_servers_message(tmp_path, capsys, text):
    path = tmp_path / "tenants.json"
    path.write_text(text)
    with pytest.raises(AuthError) as server:
        Authenticator.from_file(path)
    code, out, err = _run(capsys, "--tenants-file", str(path))
    assert (code, out, err) == (2, "", f"error: {server.value}\n")
    assert "s3cret" not in err


def _new_key(capsys) -> str:
    assert main(["keys", "new"]) == 0
    return capsys.readouterr().out.splitlines()[0].split()[1]  # "key:        nls_..."


@pytest.mark.parametrize("where", ["pattern", "padded pattern", "name"])
def test_a_key_pasted_as_an_adapter_pattern_or_name_is_refused_and_never_printed(tmp_path, capsys, where):
    """Adapter names may start with nls_, so a key pasted into "adapters" loaded, and `keys list`
    printed it. A pattern or name holding a key's shape (keys new's own) is refused, unshown."""
    key = _new_key(capsys)
    entry = {"name": "acme", "key_sha256": _sha(key), "adapters": ["acme", key]}
    if where == "padded pattern":
        entry["adapters"] = ["acme", f" {key}\n"]
    elif where == "name":
        entry.update(name=f"acme {key}", adapters=["acme"])
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [entry]}))
    code, out, err = _run(capsys, "--tenants-file", str(path))
    assert code == 2 and out == "" and key not in err and key[4:12] not in err
    assert ("adapters[1] has the shape of an API key" if where != "name" else "is a key pasted there?") in err


def test_adapter_names_starting_nls_are_still_patterns(tmp_path, capsys):
    # a valid adapter name (up to 128 of [A-Za-z0-9._-]) whose run after nls_ is longer than a key's
    # 43 characters is no key: it was refused as one ("has the shape of an API key")
    long = "nls_customer-support-summarizer-2026-12-07-v3-ft"
    patterns = ["nls_summary", "nls_*", "nls_" + "a" * 42, long, "nls_" + "a" * 44]
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"name": "acme", "key_sha256": _sha("k"), "adapters": patterns}]}))
    code, out, _ = _run(capsys, "--tenants-file", str(path), "--json")
    assert code == 0 and json.loads(out)[0]["adapters"] == patterns
