"""A tenants file that writes a field twice in one object is refused, at start and on a SIGHUP
reload (the keys in force stay), naming the field: ``json.loads`` kept the last silently, so a
second ``tenants`` list dropped every tenant of the first, and a second ``adapters`` or
``key_sha256`` in an entry replaced its grants or its key (h143)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from nlora_serve.serving.auth import AuthError, Authenticator, hash_key
from nlora_serve.serving.tenants_reload import reload_tenants

ACME = f'{{"name": "acme", "key_sha256": "{hash_key("ka")}", "adapters": ["acme"]}}'
BETA = f'{{"name": "beta", "key_sha256": "{hash_key("kb")}", "adapters": ["beta"]}}'


@pytest.mark.parametrize("text, field, entry", [
    (f'{{"tenants": [{ACME}], "tenants": [{BETA}]}}', "tenants", None),
    (f'{{"tenants": [{{"name": "acme", "key_sha256": "{hash_key("ka")}", "key_sha256": "{hash_key("kx")}"}}]}}',
     "key_sha256", "acme"),
    (f'{{"tenants": [{{"name": "acme", "key_sha256": "{hash_key("ka")}", "adapters": ["acme"], "adapters": ["*"]}}]}}',
     "adapters", "acme"),
    (f'{{"tenants": [{ACME}], "admin_keys": [], "admin_keys": [{{"name": "ops", "key_sha256": "{hash_key("ko")}"}}]}}',
     "admin_keys", None),
])
def test_a_field_written_twice_is_refused_at_start_naming_it(tmp_path, text, field, entry):
    path = tmp_path / "tenants.json"
    path.write_text(text)
    with pytest.raises(AuthError) as caught:
        Authenticator.from_file(path)
    message = str(caught.value)
    assert f"field {field!r} is given twice" in message and str(path) in message
    assert (f"entry named {entry!r}" in message) == (entry is not None)
    assert hash_key("kx") not in message and hash_key("ka") not in message  # values are never shown


def test_toml_refuses_a_field_written_twice_too(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(f'[[tenants]]\nname = "acme"\nkey_sha256 = "{hash_key("ka")}"\nadapters = ["acme"]\nadapters = ["*"]\n')
    with pytest.raises(AuthError, match="cannot read it as TOML"):
        Authenticator.from_file(path)


def test_a_reload_of_a_file_with_a_field_written_twice_keeps_the_keys_in_force(tmp_path, caplog):
    path = tmp_path / "tenants.json"
    path.write_text(f'{{"tenants": [{ACME}]}}')
    auth = Authenticator.from_file(path)
    weights = []
    engine = SimpleNamespace(set_tenant_weights=weights.append)
    path.write_text(f'{{"tenants": [{ACME}], "tenants": [{BETA}]}}')  # read whole, this had served beta alone
    with caplog.at_level(logging.ERROR, "nlora_serve.tenants"):
        assert reload_tenants(auth, str(path), engine) is False
    assert "NOT reloaded" in caplog.text and "field 'tenants' is given twice" in caplog.text
    assert auth.authenticate([("authorization", "Bearer ka")]).name == "acme" and weights == []


@pytest.mark.parametrize("entry, says", [
    ({"name": "n" * 257}, "is 257 characters; at most 256"),
    ({"name": "acme", "base_model": "x" * 100_000}, ".base_model must be true or false; got 'xxx"),
    ({"name": "acme", "weight": [1] * 100_000}, ".weight must be"),
    ({"name": ["n"] * 100_000}, ".name must be a non-empty string; got ['n'"),
    ({"name": "acme", **{f"f{i}" * 1000: 1 for i in range(1000)}}, "and 995 more; expected only"),
])
def test_a_refusal_quotes_at_most_a_few_hundred_characters_of_the_file(entry, says):
    """The message goes to stderr at start and to the log on a reload: a 100,000-character value
    (or 1,000 unknown fields, or a name of any length, which every log line and metrics label of the
    tenant then carried) was a line of that size (h143)."""
    doc = {"tenants": [{"key_sha256": hash_key("ka"), **entry}]}
    with pytest.raises(AuthError) as caught:
        Authenticator.from_document(doc, "t.json")
    assert says in str(caught.value) and len(str(caught.value)) < 1500, len(str(caught.value))
