"""asyncio client for an nlora-serve server; the same calls as :class:`NloraClient`, awaited.

    async with AsyncNloraClient("127.0.0.1:50051", api_key=KEY) as client:
        async for delta in client.generate("Once upon a time", adapter="acme", max_tokens=32):
            print(delta.text, end="")
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc

from nlora_serve.client import messages as msgs
from nlora_serve.client.types import AdapterInfo, Delta, error_from
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc


class AsyncNloraClient:
    """One grpc.aio channel to ``target``; create it inside a running event loop."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = None):
        self._md = msgs.metadata(api_key)  # first: a key gRPC cannot carry opens no channel
        self.channel = grpc.aio.insecure_channel(target)
        self._gen = pb_grpc.GenerationStub(self.channel)
        self._admin = pb_grpc.AdapterAdminStub(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncNloraClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                       adapter: str | None = None, request_id: str = "", timeout: float | None = None,
                       api_key: str | None = None, **sampling) -> AsyncIterator[Delta]:
        """Stream a generation; closing the iterator early cancels the call on the server.
        ``api_key``: this call's key instead of the client's (a load test sending as several tenants).

        Raises:
            InvalidInput: ``api_key`` has a character gRPC metadata cannot carry (before any call).
        """
        md = self._md if api_key is None else msgs.metadata(api_key)
        req = msgs.generate_request(prompt, messages=messages, adapter=adapter, request_id=request_id,
                                        **sampling)
        call = self._gen.Generate(req, metadata=md, timeout=timeout or self.timeout)
        try:
            async for msg in call:
                yield Delta.from_proto(msg)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()

    async def complete(self, prompt: str | list[int] | None = None, **kwargs) -> tuple[str, list[Delta]]:
        """Run :meth:`generate` to the end; returns (whole text, every delta)."""
        deltas = [d async for d in self.generate(prompt, **kwargs)]
        return "".join(d.text for d in deltas), deltas

    async def list_adapters(self) -> tuple[list[AdapterInfo], bool]:
        resp = await self._unary(self._gen.ListAdapters, pb.ListAdaptersRequest())
        return [AdapterInfo.from_proto(a) for a in resp.adapters], resp.base_model_allowed

    async def server_info(self) -> pb.ServerInfo:
        return await self._unary(self._gen.GetServerInfo, pb.GetServerInfoRequest())

    async def load_adapter(self, name: str, version: int = 0) -> AdapterInfo:
        """Serve ``name``'s newest stored version again; with ``version``, roll back to that version
        kept in the server's store (``serve --keep-versions``), as the name's next version."""
        request = pb.LoadAdapterRequest(name=name, version=version)
        return AdapterInfo.from_proto(await self._unary(self._admin.LoadAdapter, request))

    async def upload_adapter(self, name: str, adapter_dir: str | os.PathLike,
                             chunk_bytes: int = msgs.CHUNK_BYTES) -> AdapterInfo:
        parts = msgs.upload_parts(name, adapter_dir, chunk_bytes)
        return AdapterInfo.from_proto(await self._unary(self._admin.UploadAdapter, parts))

    async def swap_adapter(self, name: str, weights: bytes | str | os.PathLike,
                           if_version: int | None = None) -> AdapterInfo:
        req = msgs.swap_request(name, weights, if_version)
        return AdapterInfo.from_proto(await self._unary(self._admin.SwapAdapter, req))

    async def unload_adapter(self, name: str, force: bool = False) -> pb.UnloadAdapterResponse:
        return await self._unary(self._admin.UnloadAdapter, pb.UnloadAdapterRequest(name=name, force=force))

    async def _unary(self, method, request):
        try:
            return await method(request, metadata=self._md, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
