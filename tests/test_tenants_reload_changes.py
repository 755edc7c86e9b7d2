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


def test_serve_reloads_on_sighup_off_the_event_loop_one_reload_at_a_time(monkeypatch):
    """serve's SIGHUP handler only hands the reload to the reload thread: read, parsed and checked on
    the loop, a file of 10,000 tenants held every stream 0.1-0.3 s (50,000: 1.5 s). Two signals
    reload in the order they came, one after the other."""
    import asyncio
    import functools
    import threading
    import time
    from types import SimpleNamespace

    from nlora_serve.serving.server import NloraServer

    runs = []  # (thread, start, end) of each reload

    def reload_tenants() -> bool:
        start = time.perf_counter()
        time.sleep(0.05)  # a slow file: the second signal arrives while this one is read
        runs.append((threading.current_thread(), start, time.perf_counter()))
        return True

    async def noop(*args, **kwargs):
        return True

    fake = SimpleNamespace(start=noop, shutdown=noop, reload_tenants=reload_tenants,
                           generation=SimpleNamespace(auth=SimpleNamespace(enabled=True)),
                           engine=SimpleNamespace(dead_reason=None), admission=SimpleNamespace(inflight=0),
                           config=SimpleNamespace(drain_seconds=0.0))
    fake.reload_tenants_soon = functools.partial(NloraServer.reload_tenants_soon, fake)
    monkeypatch.setattr(serve_cli, "ready_lines", lambda server, adapters: [])

    async def main():
        loop_thread = threading.current_thread()
        task = asyncio.create_task(serve_cli.serve(fake, []))
        await asyncio.sleep(0.01)  # the handlers are installed
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(runs) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # serve's stop
        assert await asyncio.wait_for(task, 10)
        return loop_thread

    previous = signal.getsignal(signal.SIGHUP)
    try:
        loop_thread = asyncio.run(main())
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert len(runs) == 2 and all(thread is not loop_thread for thread, _, _ in runs), runs
    assert runs[0][2] <= runs[1][1]  # one at a time, in order
