"""A disk that fills up or fails during an upload, a swap or an unload (issue 16): ENOSPC / EIO
injected at each store write point (nlora_serve.adapters.store.durable's fault hook) answers
RESOURCE_EXHAUSTED naming the disk error, leaves the store byte-for-byte unchanged, and the
server serves on (the adapter still answers the transformers reference)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import safetensors.torch

from nlora_serve.adapters.store import durable
from nlora_serve.client import NloraClient, ResourceExhausted
from serving_check import CASES, TIED, still_serves

FRESH = "fresh-tenant"


def _tree(root) -> dict[str, str]:
    """Every path under the store root -> sha256 of its bytes ("dir" for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


class FailAt:
    """Raises ``OSError(code)`` at the ``at``-th store file operation (0-based), once."""

    def __init__(self, at: int, code: int):
        self.at, self.code, self.seen, self.fired = at, code, 0, None

    def __call__(self, op) -> None:
        self.seen += 1
        if self.seen - 1 == self.at:
            self.fired = op.kind
            raise OSError(self.code, "injected: " + os.strerror(self.code), str(op.path))


@pytest.fixture
def hook():
    holder = {}

    def install(fault):
        holder.setdefault("previous", durable.set_fault_hook(fault))
        durable.set_fault_hook(fault)
    yield install
    durable.set_fault_hook(holder.get("previous"))


def _halved_n(path) -> bytes:
    tensors = safetensors.torch.load(path.read_bytes())
    return safetensors.torch.save({k: v * 0.5 for k, v in tensors.items()})


def test_a_disk_error_at_each_write_point_changes_nothing_and_the_server_serves_on(make_server, hook):
    server = make_server()
    store = server.engine.adapters.registry.store
    with NloraClient(server.target, timeout=120) as client:
        client.upload_adapter(TIED, CASES / TIED)
        swap = _halved_n(server.engine.adapters.registry.get(TIED).path / "adapter_model.safetensors")
        operations = [("upload", lambda: client.upload_adapter(FRESH, CASES / TIED)),
                      ("swap", lambda: client.swap_adapter(TIED, swap)),
                      ("unload", lambda: client.unload_adapter(FRESH))]
        outcomes = []
        for label, call in operations:
            for at in range(40):
                store.wait_deleted()
                before, listed = _tree(store.root), client.list_adapters()[0]
                fault = FailAt(at, errno.ENOSPC if at % 2 == 0 else errno.EIO)
                hook(fault)
                try:
                    call()
                except ResourceExhausted as exc:
                    hook(None)
                    message = str(exc)
                    assert "disk refused the write" in message and ("ENOSPC" in message or "EIO" in message), message
                    assert exc.reason == "store_write_failed", (label, exc.reason)  # nlora-reason: HTTP's code (507)
                    store.wait_deleted()
                    assert _tree(store.root) == before, (label, at, fault.fired)
                    assert client.list_adapters()[0] == listed, (label, at)
                    if at == 0:  # serving on: TIED is unswapped until the swap succeeds
                        still_serves(server.target, TIED if label != "unload" else None)
                    outcomes.append((label, fault.fired))
                    continue
                finally:
                    hook(None)
                break  # the operation ran past its last write point: it succeeded
            else:
                pytest.fail(f"{label} still failing after 40 injected points")
    kinds = {kind for _, kind in outcomes}
    assert {"mkdir", "create", "write", "fsync_file", "fsync_dir", "rename"} <= kinds, outcomes
    assert sum(1 for label, _ in outcomes if label == "unload") == 4  # create, write, fsync, fsync of the folder
