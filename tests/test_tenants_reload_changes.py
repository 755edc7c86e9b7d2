"""The tenants reload's log line (serving/tenants_reload.py ``changes``): what changed, by name,
never a key or a hash; and a SIGHUP while ``serve`` is not serving yet is logged, not fatal."""

from __future__ import annotations

import logging
import os
import signal

from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.auth import Authenticator, hash_key
from nlora_serve.serving.tenants_reload import changes


def _auth(admins: dict[str, list[str]], tenants: dict[str, tuple[list[str], dict]]) -> Authenticator:
    """name -> keys for admins; name -> (keys, fields) for tenants."""
    doc = {"admin_keys": [{"name": name, "key_sha256": hash_key(k)} for name, keys in admins.items() for k in keys],
           "tenants": [{"name": name, "key_sha256": hash_key(k), **fields}
                       for name, (keys, fields) in tenants.items() for k in keys]}
    return Authenticator.from_document(doc, "tenants.json")


def test_the_line_names_added_removed_and_changed_tenants_and_what_changed():
    old = _auth({"ops": ["op1"], "night": ["n1"]},
                {"acme": (["a1", "a2"], {"adapters": ["acme"]}),
                 "beta": (["b1"], {"adapters": ["beta-*"], "weight": 2, "max_concurrent_requests": 4}),
                 "gone": (["g1"], {}),
                 "same": (["s1"], {"base_model": True})})
    new = _auth({"ops": ["op1"], "promoted": ["p1"]},
                {"acme": (["a2", "a3", "a4"], {"adapters": ["acme"]}),  # a1 revoked, two added
                 "beta": (["b1"], {"adapters": ["beta-*", "x"], "weight": 0.5}),
                 "same": (["s1"], {"base_model": True}),
                 "fresh": (["f1"], {})})
    line = changes(old, new)
    assert line == ("added 'fresh', 'promoted' (admin); removed 'gone', 'night' (admin); changed "
                    "'acme' (keys: 2 added, 1 revoked), "
                    "'beta' (grants, weight 2 -> 0.5, max_concurrent_requests 4 -> None)")
    for key in ("a1", "a2", "a3", "a4", "b1", "f1", "p1", "n1"):
        assert key not in line.split("'") and hash_key(key) not in line and hash_key(key)[:12] not in line


def test_an_admin_turned_tenant_and_an_unchanged_file():
    old = _auth({"ops": ["k"]}, {})
    assert changes(old, _auth({}, {"ops": (["k"], {"base_model": True})})) == "changed 'ops' (admin -> tenant, grants)"
    assert changes(old, _auth({"ops": ["k"]}, {})) == "no changes"
    # a file without a key is refused by the loader (tests/grpc/test_grpc_auth.py), never reaches changes()


def test_a_sighup_while_starting_is_logged_and_the_previous_handler_comes_back(caplog):
    previous = signal.getsignal(signal.SIGHUP)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.serve"), serve_cli._hup_not_serving():
        os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process
    assert [r.getMessage() for r in caplog.records] == [
        "SIGHUP while not serving (starting or stopping): the tenants file is not re-read; send it again once "
        "the server is ready"]
    assert signal.getsignal(signal.SIGHUP) is previous
