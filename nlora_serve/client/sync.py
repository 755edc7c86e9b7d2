"""Blocking client for an nlora-serve server (talks only through ``nlora_serve.proto``).

    with NloraClient("127.0.0.1:50051", api_key=KEY) as client:
        for delta in client.generate(messages=[{"role": "user", "content": "Hi"}], adapter="acme"):
            print(delta.text, end="")

Every failed call raises a :class:`~nlora_serve.client.types.NloraClientError` subclass named
after its status code (NotFound, InvalidArgument, ResourceExhausted, PermissionDenied, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc

from nlora_serve.client import messages as msgs
from nlora_serve.client.types import AdapterInfo, Delta, error_from
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc


class NloraClient:
    """One channel to ``target`` (``host:port``); ``timeout`` (seconds) is every call's deadline
    unless a call gives its own (None = no deadline)."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = None):
        self._md = msgs.metadata(api_key)  # first: a key gRPC cannot carry opens no channel
        self.channel = grpc.insecure_channel(target)
        self._gen = pb_grpc.GenerationStub(self.channel)
        self._admin = pb_grpc.AdapterAdminStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NloraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                 adapter: str | None = None, request_id: str = "", timeout: float | None = None,
                 **sampling) -> Iterator[Delta]:
        """Stream a generation (see :func:`msgs.generate_request` for the arguments).

        Leaving the loop early cancels the call, so the server frees the request at once.
        """
        req = msgs.generate_request(prompt, messages=messages, adapter=adapter, request_id=request_id,
                                        **sampling)
        call = self._gen.Generate(req, metadata=self._md, timeout=timeout or self.timeout)
        try:
            for msg in call:
                yield Delta.from_proto(msg)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()  # no-op after a normal end

    def complete(self, prompt: str | list[int] | None = None, **kwargs) -> tuple[str, list[Delta]]:
        """Run :meth:`generate` to the end; returns (whole text, every delta)."""
        deltas = list(self.generate(prompt, **kwargs))
        return "".join(d.text for d in deltas), deltas

    def list_adapters(self) -> tuple[list[AdapterInfo], bool]:
        """(adapters this key may use, whether it may use the base model)."""
        resp = self._unary(self._gen.ListAdapters, pb.ListAdaptersRequest())
        return [AdapterInfo.from_proto(a) for a in resp.adapters], resp.base_model_allowed

    def server_info(self) -> pb.ServerInfo:
        return self._unary(self._gen.GetServerInfo, pb.GetServerInfoRequest())

    def load_adapter(self, name: str, version: int = 0) -> AdapterInfo:
        """Serve ``name``'s newest stored version again; with ``version``, roll back to that version
        kept in the server's store (``serve --keep-versions``), as the name's next version."""
        request = pb.LoadAdapterRequest(name=name, version=version)
        return AdapterInfo.from_proto(self._unary(self._admin.LoadAdapter, request))

    def upload_adapter(self, name: str, adapter_dir: str | os.PathLike,
                       chunk_bytes: int = msgs.CHUNK_BYTES) -> AdapterInfo:
        """Upload a PEFT-style directory in chunks as the next version of ``name``."""
        parts = msgs.upload_parts(name, adapter_dir, chunk_bytes)
        return AdapterInfo.from_proto(self._unary(self._admin.UploadAdapter, parts))

    def swap_adapter(self, name: str, weights: bytes | str | os.PathLike,
                     if_version: int | None = None) -> AdapterInfo:
        """Hot-swap a tied tenant's N from safetensors bytes or a file path."""
        req = msgs.swap_request(name, weights, if_version)
        return AdapterInfo.from_proto(self._unary(self._admin.SwapAdapter, req))

    def unload_adapter(self, name: str, force: bool = False) -> pb.UnloadAdapterResponse:
        return self._unary(self._admin.UnloadAdapter, pb.UnloadAdapterRequest(name=name, force=force))

    def _unary(self, method, request):
        try:
            return method(request, metadata=self._md, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
