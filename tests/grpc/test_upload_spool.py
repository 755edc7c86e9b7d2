"""UploadAdapter's bytes reach the registry without the event loop waiting for their copy
(grpc_api/spool.py): the chunks go into an in-memory file as they arrive, and the worker thread
reads them back into one ``bytes`` with the GIL released. The copy of a ``bytearray`` into
``bytes`` it did before held the GIL throughout, so every stream waited 0.38-0.47 s for a 256 MiB
upload (loaded 2-core box; 40-140 ms after: /work/scratch/helper-116/upload_lag.py in the report).
Unit level: the servicer with a fake adapter manager, no server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from types import SimpleNamespace

from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.serving.grpc_api import admin
from nlora_serve.serving.grpc_api.spool import Spool


def test_the_spool_reads_back_what_was_appended():
    spool = Spool()
    for part in (b"ab", b"", b"c" * 100_000, b"d"):
        spool.append(part)
    assert spool.size == 100_003 and spool.read() == b"ab" + b"c" * 100_000 + b"d"
    spool.close()
    spool.close()  # idempotent


def _servicer(registered: list) -> admin.AdminServicer:
    servicer = admin.AdminServicer.__new__(admin.AdminServicer)  # no engine: the upload path only
    manager = SimpleNamespace(register=lambda name, files: registered.append((name, files)) or "version")
    servicer._manager = lambda: manager
    servicer.config = SimpleNamespace(max_adapter_bytes=1 << 20, check_adapter_name=lambda name: None)
    servicer.metrics = SimpleNamespace(load=SimpleNamespace(observe=lambda seconds: None))
    servicer.engine = SimpleNamespace(is_resident=lambda version: False)
    return servicer


def test_an_upload_is_spooled_on_the_loop_and_read_back_in_the_worker_thread(monkeypatch):
    chunks = [os.urandom(1000), os.urandom(24), os.urandom(3000)]
    weights = b"".join(chunks)
    reads, registered = [], []

    class Recorded(Spool):
        def read(self) -> bytes:
            reads.append(threading.current_thread())
            return super().read()

    monkeypatch.setattr(admin, "Spool", Recorded)
    monkeypatch.setattr(admin.convert, "adapter_info", lambda version, resident: version)
    servicer = _servicer(registered)
    fds = len(os.listdir("/proc/self/fd"))

    async def parts():
        yield pb.UploadAdapterRequest(header=pb.UploadHeader(
            name="up", adapter_config_json="{}", safetensors_bytes=len(weights),
            safetensors_sha256=hashlib.sha256(weights).hexdigest()))
        for chunk in chunks:
            yield pb.UploadAdapterRequest(chunk=chunk)

    async def upload():
        return threading.current_thread(), await servicer._upload(parts())

    loop_thread, reply = asyncio.run(upload())
    assert reply == "version" and registered == [("up", {"adapter_config.json": b"{}",
                                                          "adapter_model.safetensors": weights})]
    assert len(reads) == 1 and reads[0] is not loop_thread
    assert len(os.listdir("/proc/self/fd")) == fds  # the spool's file is closed

    async def short():  # refused on the loop (fewer bytes than announced): the spool is closed too
        yield pb.UploadAdapterRequest(header=pb.UploadHeader(name="up", adapter_config_json="{}",
                                                             safetensors_bytes=10))
        yield pb.UploadAdapterRequest(chunk=b"abc")

    try:
        asyncio.run(servicer._upload(short()))
    except admin.AdapterError as exc:
        assert "received 3 bytes" in str(exc)
    else:
        raise AssertionError("a short upload was accepted")
    assert len(os.listdir("/proc/self/fd")) == fds and len(registered) == 1
