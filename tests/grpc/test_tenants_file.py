"""The tenants file and the key check without a server: what serving/auth.py accepts, what it
refuses and how it says so (a server's keys and grants: test_grpc_auth.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading

import pytest

from nlora_serve.cli import console_command
from nlora_serve.serving.auth import AuthError, Authenticator, hash_key
from nlora_serve.serving import auth as serving_auth
from nlora_serve.serving.server_config import ServerConfig


def test_tenants_file_nested_past_the_parser_is_an_auth_error(tmp_path):
    path = tmp_path / "tenants.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AuthError, match="cannot read it"):
        Authenticator.from_file(path)


def test_a_tenants_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    """SIGHUP reads the file on the event loop: a FIFO put in its place blocked the open until a
    writer came, freezing every tenant's requests (and SIGTERM) for good."""
    path = tmp_path / "tenants.json"
    os.mkfifo(path)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_auth_error(path)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open(): release it (a writer that opens without blocking)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert outcome == [f"tenants file {path}: cannot read it (not a regular file: a FIFO)"]


def test_a_tenants_file_over_its_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A huge file (here sparse: no disk) was read whole into memory, as bytes then text: a SIGHUP
    with a 20 GB file in the tenants file's place took the serving process to the OOM killer."""
    from nlora_serve.serving import tenants_file

    path = tmp_path / "tenants.json"
    with open(path, "wb") as f:
        f.truncate(tenants_file.MAX_FILE_BYTES + 1)
    assert _auth_error(path) == (f"tenants file {path}: cannot read it ({tenants_file.MAX_FILE_BYTES + 1:,} bytes: a "
                                 "tenants file holds at most 67,108,864 bytes (64 MiB, some 450,000 tenants); is it "
                                 "the right file?)")
    # a file whose size the kernel does not say (procfs: st_size 0) is cut after the bound + 1 bytes
    monkeypatch.setattr(tenants_file, "MAX_FILE_BYTES", 10)
    assert "(more bytes: a tenants file holds at most 10 bytes" in _auth_error("/proc/self/status")


@pytest.mark.parametrize("headers", [
    [("authorization", "Bearer k1"), ("Authorization", "Bearer k2")],  # two tenants' keys
    [("authorization", "Bearer k1"), ("authorization", "Bearer k1")],  # the same key twice
    [("authorization", "Basic dXNlcg=="), ("authorization", "Bearer k2")],
])
def test_more_than_one_authorization_entry_is_refused(tmp_path, headers):
    """The first Bearer entry was taken: which key a call ran on depended on the order of the
    headers, which a proxy adding or checking its own one may not share."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tenants": [_tenant("a", "k1"), _tenant("b", "k2")]}))
    auth = Authenticator.from_file(path)
    assert auth.authenticate([("authorization", "Bearer k2")]).name == "b"
    with pytest.raises(serving_auth.Unauthenticated, match="^2 'authorization' headers \\(or gRPC metadata entries\\): send one"):
        auth.authenticate(headers)


@pytest.mark.parametrize("headers, says", [
    ([("authorization", "k1")], "not 'Bearer <key>'"),  # the key without its scheme (h130)
    ([("authorization", "Basic dXNlcg==")], "not 'Bearer <key>'"),
    ([("authorization", "Bearer ")], "^missing credentials"),  # an unset $NLORA_API_KEY after Bearer
    ([], "^missing credentials"),
])
def test_an_authorization_entry_that_is_not_bearer_says_so_without_echoing_it(tmp_path, headers, says):
    """A newcomer's find: curl -H "Authorization: $KEY" got "missing credentials" though a key was sent."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tenants": [_tenant("a", "k1")]}))
    with pytest.raises(serving_auth.Unauthenticated, match=says) as err:
        Authenticator.from_file(path).authenticate(headers)
    assert "k1" not in str(err.value) and "dXNlcg" not in str(err.value)


@pytest.mark.parametrize("name, text, says", [
    ("t.json", '{"tenants": [{"name": "a", "key_sha256": "%s"},]}' % ("0" * 64),  # a trailing comma (h130)
     "cannot read it as JSON (Expecting value: line 1 column 110 (char 109))"),  # 109: the "]" after it
    ("t.toml", '[[tenants]]\nname = "a\n', "cannot read it as TOML (Illegal character"),
])
def test_a_tenants_file_with_a_syntax_error_names_the_format_and_the_place(tmp_path, name, text, says):
    """A newcomer's find: "cannot read it (Expecting value: ...)" read as a file-permission problem."""
    path = tmp_path / name
    path.write_text(text)
    assert _auth_error(path).startswith(f"tenants file {path}: {says}")


def _auth_error(path) -> str | None:
    try:
        Authenticator.from_file(path)
    except AuthError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("section, value, kind", [
    ("admin_keys", None, "NoneType"), ("tenants", 5, "int"), ("tenants", "acme", "str"),
    ("tenants", {"name": "acme", "key_sha256": hash_key("k")}, "dict"),  # one entry, not a list of them
])
def test_a_section_that_is_not_a_list_is_an_auth_error_naming_it(tmp_path, section, value, kind):
    """null or a number crashed the start with a TypeError; a string or an object was read entry by
    entry (its letters, its keys) and refused as "tenants[0]: expected an object"."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({section: value}))
    with pytest.raises(AuthError) as err:
        Authenticator.from_file(path)
    assert str(err.value) == f"tenants file {path}: {section} must be a list of entries ({{...}}, ...); got {kind}"


def test_tenants_file_refuses_plaintext_keys_and_bad_hashes(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tenants": [{"name": "a", "key": "plain"}]}))
    with pytest.raises(AuthError, match="plaintext key"):
        Authenticator.from_file(path)
    path.write_text(json.dumps({"tenants": [{"name": "a", "key_sha256": "abc"}]}))
    with pytest.raises(AuthError, match="64 hex"):
        Authenticator.from_file(path)
    digest = hash_key("k")
    path.write_text(json.dumps({"admin_keys": [{"key_sha256": digest}], "tenants": [{"key_sha256": digest}]}))
    with pytest.raises(AuthError) as both:
        Authenticator.from_file(path)
    # the file and the entry, as every other refusal of the file names them (it named neither)
    assert str(both.value) == (f"{path}: tenants[0].key_sha256 {digest[:12]}... is given to both 'admin-0' "
                               "and 'tenant-0'")


PLAIN = "sk-live-" + "Zq9" * 10  # 38 characters, a plaintext key pasted where its hash belongs
HOW = f'echo -n "$KEY" | {console_command()} keys hash'


@pytest.mark.parametrize("section, value, says", [
    ("tenants", PLAIN, "must be 64 hex characters (sha256 of the key); got 38 characters, not all hex "
                       f"(not shown: if it is the plaintext key, store its sha256 instead: {HOW})"),
    ("admin_keys", "f" * 63, "must be 64 hex characters (sha256 of the key); got 63 characters "
                             f"(not shown: if it is the plaintext key, store its sha256 instead: {HOW})"),
    ("tenants", 12345678901234567890, "must be a string of 64 hex characters (sha256 of the key); got a int"),
])
def test_a_bad_key_sha256_is_described_never_echoed(tmp_path, section, value, says):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({section: [{"name": "a", "key_sha256": value}]}))
    with pytest.raises(AuthError) as err:
        Authenticator.from_file(path)
    assert str(err.value) == f"{path}: {section}[0].key_sha256 {says}"
    assert str(value) not in str(err.value)


def test_a_missing_key_sha256_says_how_to_make_one(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tenants": [{"name": "a"}]}))
    with pytest.raises(AuthError) as err:
        Authenticator.from_file(path)
    assert str(err.value) == f"{path}: tenants[0]: key_sha256 is missing; store the sha256 of the key ({HOW})"


@pytest.mark.parametrize("doc, field", [
    ({"admins": [{"key_sha256": hash_key("k")}]}, "'admins'"),  # would leave no admin key
    ({"tenants": [{"key_sha256": hash_key("k"), "base_modle": True}]}, "'base_modle'"),
    ({"tenants": [{"key_sha256": hash_key("k"), "adapter": ["a"]}]}, "'adapter'"),
    ({"admin_keys": [{"key_sha256": hash_key("k"), "adapters": ["a"]}]}, "'adapters'"),
])
def test_tenants_file_refuses_fields_it_does_not_know(tmp_path, doc, field):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AuthError, match=f"unknown field.*{field}"):
        Authenticator.from_file(path)


def test_toml_tenants_file_and_glob_grants(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(f'[[tenants]]\nname = "acme"\nkey_sha256 = "{hash_key("acme-key")}"\n'
                    'adapters = ["acme-*"]\n')
    auth = Authenticator.from_file(path)
    principal = auth.authenticate([("authorization", "Bearer acme-key")])
    assert principal.name == "acme" and principal.may_use("acme-v2") and not principal.may_use("acme")
    assert not principal.may_use(None) and not principal.is_admin
    # the stored hash is sha256 of the key's UTF-8 bytes (value from coreutils `sha256sum`)
    assert hash_key("acme-key") == "afacab3575137afa4e00d9cbcafcb14c9ae25f779d964eb0ea5b2c4eb5dfd163"


def test_no_auth_means_loopback_only():
    assert ServerConfig(host="127.0.0.1").tenants_file is None
    assert ServerConfig(host="::1").address == "[::1]:50051"
    with pytest.raises(ValueError, match="binds only to 127.0.0.1"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", tenants_file="tenants.json").host == "0.0.0.0"


def _tenant(name, key, **fields) -> dict:
    return {"name": name, "key_sha256": hash_key(key), **fields}


_KEY = "nls_" + "k3y" * 14 + "Z"  # as `keys new` makes one: 47 characters


@pytest.mark.parametrize("text", [
    json.dumps({"tenants": [{"name": _KEY, "key_sha256": "0" * 64, "adapters": ["a"]}]}),  # name and key swapped
    json.dumps({"tenants": [_tenant("a", "k", adapters=["a"], weight=_KEY)]}),
    json.dumps({"tenants": [_tenant("a", "k", adapters=["a"], max_concurrent_requests=_KEY)]}),
    json.dumps({"tenants": [_tenant("a", "k", adapters=["a"], base_model=_KEY)]}),
    json.dumps({"tenants": [{**_tenant("a", "k", adapters=["a"]), _KEY: True}]}),  # pasted as a field
    json.dumps({_KEY: []}),
    # inside a list or an object: its repr quoted it whole
    json.dumps({"tenants": [{"name": [_KEY], "key_sha256": "0" * 64, "adapters": ["a"]}]}),
    json.dumps({"tenants": [_tenant("a", "k", adapters=["a"], weight={"key": _KEY})]}),
    '{"tenants": [{"name": "%s", "name": "%s", "key_sha256": "%s"}]}' % (_KEY, _KEY, "0" * 64),  # duplicate field
])
def test_a_key_pasted_into_the_wrong_field_is_refused_without_echoing_it(tmp_path, text):
    """A refusal quoted the misplaced value (SIGHUP's reload writes it to the server's log), and a
    key as a tenant's name was accepted: written into every log line and /metrics' tenant label."""
    path = tmp_path / "tenants.json"
    path.write_text(text)
    message = _auth_error(path)
    assert message is not None and "k3y" not in message, message
    assert "'nls_' (47 characters, not shown: an API key?)" in message or \
        "holding a string with 'nls_' (not shown: an API key?)" in message


@pytest.mark.parametrize("section, second", [
    ("tenants", _tenant("acme", "k2", adapters=["globex"])),  # another customer under the same name
    ("tenants", _tenant("acme", "k2", adapters=["acme"], weight=2)),
    ("admin_keys", {"name": "acme", "key_sha256": hash_key("k2")}),
])
def test_a_name_two_entries_share_with_other_settings_is_refused(tmp_path, section, second):
    """The name is the tenant's identity (prefix-cache group, quota, fair share): two customers
    under one name would read each other's cached prompts, so the file is refused, naming it."""
    path = tmp_path / "t.json"
    doc = {"tenants": [_tenant("acme", "k1", adapters=["acme"])], "admin_keys": []}
    doc[section].append(second)
    path.write_text(json.dumps(doc))
    with pytest.raises(AuthError, match="name 'acme' is given to two entries"):
        Authenticator.from_file(path)


def test_several_keys_of_one_tenant_with_the_same_settings_are_one_tenant(tmp_path):
    path = tmp_path / "t.json"  # a key rotation: old and new key, one identity
    path.write_text(json.dumps({"tenants": [_tenant("acme", k, adapters=["acme"]) for k in ("old", "new")]}))
    auth = Authenticator.from_file(path)
    old, new = (auth.authenticate([("authorization", f"Bearer {k}")]) for k in ("old", "new"))
    assert old == new and old.name == "acme" and old.adapters == ("acme",)


@pytest.mark.parametrize("name", [5, "", None, ["acme"]])
def test_a_name_that_is_not_a_string_is_refused(tmp_path, name):
    path = tmp_path / "t.json"  # str() made 5 and 5 (or None and None) one tenant silently
    path.write_text(json.dumps({"tenants": [{"name": name, "key_sha256": hash_key("k")}]}))
    with pytest.raises(AuthError, match=r"tenants\[0\]\.name must be a non-empty string"):
        Authenticator.from_file(path)


@pytest.mark.parametrize("section, name, bad", [
    ("tenants", "acme\nINFO nlora_serve.tenants: forged", "U+000A at character 5"),  # a log line of its own
    ("tenants", "acme\x1b[2K", "U+001B at character 5"),  # ANSI escape: erases the terminal's line
    ("tenants", "\x00acme", "U+0000 at character 1"),
    ("tenants", "acme\x7f", "U+007F at character 5"),  # DEL
    ("admin_keys", "ops\x85", "U+0085 at character 4"),  # C1 next line
    ("tenants", "acme\u202egnp.exe", "U+202E at character 5"),  # bidi override: the line reads otherwise
    ("tenants", "acme\u2028x", "U+2028 at character 5"),  # line separator
    ("tenants", "acme/other", "U+002F at character 5"),  # "acme/other" + id "x" = "acme" + id "other/x"
])
def test_a_name_with_a_control_character_or_a_slash_is_refused_naming_the_entry(tmp_path, section, name, bad):
    path = tmp_path / "t.json"
    entry = {"name": name, "key_sha256": hash_key("k")} if section == "admin_keys" else _tenant(name, "k")
    path.write_text(json.dumps({section: [entry]}))
    with pytest.raises(AuthError) as err:
        Authenticator.from_file(path)
    assert str(err.value) == (
        f"{path}: {section}[0].name {name!r} has {bad}; a name must be printable characters other than '/' (no "
        "control, format or line-separator character: names are written into log lines and metrics labels, and "
        "prefix the tenant's request ids)")
    assert all(c.isprintable() for c in str(err.value))  # the message itself is safe to log


def test_names_of_printable_characters_are_accepted(tmp_path):
    path = tmp_path / "t.json"
    names = ["acme corp", "Zürich-GmbH", "ops@acme.example", "tenant_7:eu", "東京"]
    path.write_text(json.dumps({"tenants": [_tenant(name, f"k{i}", base_model=True) for i, name in enumerate(names)]}))
    auth = Authenticator.from_file(path)
    assert [auth.authenticate([("authorization", f"Bearer k{i}")]).name for i in range(len(names))] == names


@pytest.mark.parametrize("name, text", [
    ("t.json", "{}"), ("t.json", '{"tenants": [], "admin_keys": []}'), ("t.toml", ""), ("t.toml", "tenants = []\n")])
def test_a_file_without_a_key_is_refused(tmp_path, name, text):
    path = tmp_path / name  # it was accepted, and every request then refused with 401
    path.write_text(text)
    with pytest.raises(AuthError) as err:
        Authenticator.from_file(path)
    assert str(err.value) == (
        f"tenants file {path}: holds no key (no entry in 'tenants' or 'admin_keys'), so every request would be "
        f"refused; add one ({console_command()} keys new --tenant NAME --adapters PATTERN, or --admin NAME), or "
        "start without --tenants-file for a loopback-only server without auth")


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_base_model_that_is_not_a_json_boolean_is_refused(tmp_path, value):
    path = tmp_path / "t.json"  # bool("false") is True: the string granted the base model
    path.write_text(json.dumps({"tenants": [_tenant("acme", "k", base_model=value)]}))
    with pytest.raises(AuthError, match=r"tenants\[0\]\.base_model must be true or false"):
        Authenticator.from_file(path)
    path.write_text(json.dumps({"tenants": [_tenant("acme", "k", base_model=False)]}))
    assert not Authenticator.from_file(path).authenticate([("authorization", "Bearer k")]).may_use(None)


def test_the_hash_command_the_errors_suggest_runs_and_prints_the_keys_sha256():
    done = subprocess.run(["bash", "-c", HOW], capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "KEY": PLAIN})
    assert done.stdout.split() == [hashlib.sha256(PLAIN.encode()).hexdigest()]
