"""An UploadAdapter its client cancels mid-stream is logged as a cancellation, not as an admin's
refusal, and leaves nothing behind (h143). gRPC ends the server's message iterator on a cancel as
on a half-close, and cancels the handler's task a moment later: the upload was refused at once as
short, "UploadAdapter by 'ops' refused (INVALID_ARGUMENT): ... received 1000 bytes ..., the header
announced 100000", for what was the client's cancel. Unit level: the servicer with a fake manager
and context (a real server's cancel: /work/scratch/helper-143/cancel_upload.py in the report)."""

from __future__ import annotations

import asyncio
import logging
import os
from types import SimpleNamespace

import grpc

from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.serving.admin_log import AdminRefusals
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api import admin


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self):
        self.aborted = None

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ipv4:10.0.0.7:51234"

    def done(self):
        return False

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = code
        raise _Aborted(details)


def _servicer(registered: list) -> admin.AdminServicer:
    servicer = admin.AdminServicer.__new__(admin.AdminServicer)
    manager = SimpleNamespace(register=lambda name, files: registered.append(name) or "version")
    servicer._manager = lambda: manager
    servicer.config = SimpleNamespace(max_adapter_bytes=1 << 20, check_adapter_name=lambda name: None)
    servicer.metrics = SimpleNamespace(load=SimpleNamespace(observe=lambda seconds: None))
    servicer.engine = SimpleNamespace(is_resident=lambda version: False)
    servicer.auth, servicer.refusals = Authenticator(None), AdminRefusals(admin.log)
    return servicer


def _header(size: int) -> pb.UploadAdapterRequest:
    return pb.UploadAdapterRequest(header=pb.UploadHeader(name="up", adapter_config_json="{}", safetensors_bytes=size))


def test_a_cancelled_upload_is_logged_as_cancelled_and_leaves_nothing(caplog):
    registered, context = [], _Context()
    servicer = _servicer(registered)
    fds = len(os.listdir("/proc/self/fd"))

    async def run():
        ended = asyncio.Event()

        async def parts():  # the iterator ends as gRPC's does on a cancel; the task's cancel comes after
            yield _header(100_000)
            yield pb.UploadAdapterRequest(chunk=b"x" * 1000)
            ended.set()

        task = asyncio.create_task(servicer.UploadAdapter(parts(), context))
        await ended.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except _Aborted as exc:
            return f"aborted: {exc}"

    with caplog.at_level(logging.INFO, admin.log.name):
        assert asyncio.run(run()) == "cancelled"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [lines[0]] and "refused" not in lines[0]
    assert lines[0].startswith("UploadAdapter by 'local' from 10.0.0.7:51234 cancelled by the client after ")
    assert lines[0].endswith(": 1000 of 100000 bytes of 'up' received; nothing stored")
    assert registered == [] and context.aborted is None and len(os.listdir("/proc/self/fd")) == fds


def test_a_stream_that_really_ends_short_is_still_refused(caplog):
    registered, context = [], _Context()

    async def parts():
        yield _header(10)
        yield pb.UploadAdapterRequest(chunk=b"abc")

    with caplog.at_level(logging.INFO, admin.log.name):
        try:
            asyncio.run(_servicer(registered).UploadAdapter(parts(), context))
        except _Aborted as exc:
            assert "received 3 bytes" in str(exc)
    assert context.aborted == grpc.StatusCode.INVALID_ARGUMENT and registered == []
    assert [r.getMessage() for r in caplog.records][-1].startswith(
        "UploadAdapter by 'local' from 10.0.0.7:51234 refused (INVALID_ARGUMENT): upload of 'up': received 3 bytes")


def test_uploads_over_the_in_flight_cap_are_refused_before_a_byte_is_read(caplog, monkeypatch):
    """Each upload in flight holds up to --max-adapter-bytes in memory and, waiting for the registry's
    write lock, a thread of the default executor: nothing bounded how many (h143)."""
    registered, context = [], _Context()
    servicer = _servicer(registered)
    cap, read = admin.MAX_UPLOADS_IN_FLIGHT, []
    monkeypatch.setattr(admin.convert, "adapter_info", lambda version, resident: pb.AdapterInfo(
        ref=pb.AdapterRef(name="up", version=1)))

    async def run():
        gate = asyncio.Event()

        async def held():  # an upload that sent its header and waits on the network
            yield _header(3)
            await gate.wait()
            yield pb.UploadAdapterRequest(chunk=b"abc")

        async def over():
            read.append("over")
            yield _header(3)
            yield pb.UploadAdapterRequest(chunk=b"abc")

        tasks = [asyncio.create_task(servicer.UploadAdapter(held(), _Context())) for _ in range(cap)]
        await asyncio.sleep(0.01)
        try:
            await servicer.UploadAdapter(over(), context)
        except _Aborted as exc:
            refused = str(exc)
        gate.set()
        await asyncio.gather(*tasks)
        await servicer.UploadAdapter(over(), _Context())  # the slots are given back: taken again
        return refused

    with caplog.at_level(logging.INFO, admin.log.name):
        refused = asyncio.run(run())
    assert context.aborted == grpc.StatusCode.RESOURCE_EXHAUSTED and read == ["over"]  # the refused one: none
    assert refused.startswith(f"{cap} uploads are in flight on this server") and "retry" in refused
    assert registered == ["up"] * (cap + 1) and servicer.uploads == 0


def test_a_swap_cancelled_in_its_worker_thread_is_logged_as_still_landing(caplog):
    """A cancel does not stop the worker thread a change was handed to: the line must not read as
    "nothing happened" while the new version goes on to serve."""
    import threading

    started, release, swapped = threading.Event(), threading.Event(), []
    servicer = _servicer([])

    def swap(name, weights, if_version):
        started.set()
        release.wait(5)
        swapped.append(name)
        return "version"

    manager = SimpleNamespace(swap=swap, registry=SimpleNamespace(get=lambda name: SimpleNamespace(swaps_n=True)))
    servicer._manager = lambda: manager

    async def run():
        task = asyncio.create_task(servicer.SwapAdapter(pb.SwapAdapterRequest(name="lower", n_safetensors=b"n"),
                                                        _Context()))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        release.set()

    with caplog.at_level(logging.INFO, admin.log.name):
        asyncio.run(run())
    assert swapped == ["lower"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("SwapAdapter by 'local' from 10.0.0.7:51234 cancelled by the client after ")
    assert line.endswith(": a change already handed to its worker thread still completes (ListAdapters shows what serves)")


def test_a_cancelled_upload_holds_its_slot_until_its_worker_thread_ends(caplog):
    """A cancel does not stop the worker thread (it holds the payload as bytes, waiting for the
    registry's write lock): its slot was given back at the cancel, so a client cancelling each
    upload after its last byte had any number of payloads in memory and threads, the cap unbounded."""
    import threading

    started, release = threading.Event(), threading.Event()
    servicer = _servicer([])

    def register(name, files):
        started.set()
        release.wait(5)
        return "version"

    servicer._manager = lambda: SimpleNamespace(register=register)

    async def run():
        async def parts():
            yield _header(3)
            yield pb.UploadAdapterRequest(chunk=b"abc")

        task = asyncio.create_task(servicer.UploadAdapter(parts(), _Context()))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        held = servicer.uploads  # the thread still holds the bytes
        release.set()
        for _ in range(200):
            if servicer.uploads == 0:
                break
            await asyncio.sleep(0.005)
        return held, servicer.uploads

    with caplog.at_level(logging.INFO, admin.log.name):
        assert asyncio.run(run()) == (1, 0)
