"""vLLM's runtime adapter endpoints over HTTP: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, in the shapes of vLLM's LoadLoRAAdapterRequest /
UnloadLoRAAdapterRequest and their plain-text answers, for operators whose scripts drive vLLM.

Off unless the server starts with ``--allow-runtime-lora-updating`` (or vLLM's environment variable
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``), as vLLM gates them: ``lora_path`` is a folder on the
server's own disk. Off, both answer 404 naming the flag (vLLM: a bare 404).

- load ``{"lora_name", "lora_path", "load_inplace": false}``: registers the adapter folder
  ``lora_path`` (``adapter_config.json`` + ``adapter_model.safetensors``, a compact family member,
  or a Hugging Face ``ORG/NAME`` already in the HF cache, as ``serve --adapter NAME=DIR`` takes) as
  ``lora_name``'s next version, written to the adapter store as an upload is, so it survives a
  restart. A name already served is refused unless ``load_inplace`` (then it becomes the next
  version: running requests finish on theirs, and the prefix cache never mixes them up, its
  blocks being keyed by each version's content hash). 200 ``Success: LoRA adapter 'NAME' added
  successfully.``
- unload ``{"lora_name"}``: stops serving the name, as ``adapters unload`` without ``--force``
  (running requests finish; the store remembers it). 200 ``Success: LoRA adapter 'NAME' removed
  successfully.`` (vLLM's body, which says nothing more), with the requests still running on the
  name, or still to be queued by a response holding it, in the header ``X-Draining-Requests``
  (gRPC UnloadAdapter's ``draining_requests``) and the server's log; 404 for a name not served.

Both need an admin key (401 without a key, 403 for a tenant's), as gRPC's AdapterAdmin does.
Refusals come in OpenAI's error shape: an invalid name or an adapter the loader refuses 400 (the
loader's message), a missing folder 404, files over ``--max-adapter-bytes`` together 413 (checked
before any byte is read), a server without an adapter store 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.runtime.version import AdapterNotFound, AdapterVersion, VersionConflict
from nlora_serve.adapters.store import ALLOWED_FILES
from nlora_serve.errors import AdapterError, NloraError, shown
from nlora_serve.models.hub import local_or_hub
from nlora_serve.serving.admin_log import log_done
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.status import RuntimeUpdatingOff, TooLarge, adapter_manager, http_status_of
from nlora_serve.serving.http_api.body import parsed_json, validated
from nlora_serve.serving.http_api.context import HttpContext
from nlora_serve.serving.http_api.generate import read_body
from nlora_serve.serving.http_api.request_models import ParamError, unsupported
from nlora_serve.serving.server_config import ENV_FLAG

log = logging.getLogger(__name__)


class _Body(BaseModel):
    # extra fields are refused one by one (naming each); strict: "true" is no boolean
    model_config = ConfigDict(extra="allow", strict=True)
    lora_name: str


class LoadLoraAdapter(_Body):
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False  # vLLM's MoE weight layout: false only


class UnloadLoraAdapter(_Body):
    lora_int_id: int | None = None  # vLLM's engine-side id: accepted and ignored (names are the ids here)


async def load_lora_adapter(ctx: HttpContext, request: Request) -> Response:
    """``POST /v1/load_lora_adapter``.

    Raises:
        NloraError: a refusal (the app's handler answers it in OpenAI's error shape; see the module).
        RequestValidationError: a body that is not JSON or not a valid request.
    """
    return await _refusals_logged(ctx, request, _load)


async def _refusals_logged(ctx: HttpContext, request: Request, handler) -> Response:
    """``handler(ctx, request, caller)``; a refusal is logged naming the caller (admin_log.py), then
    raised for the app's handler to answer."""
    caller = _caller(ctx, request)
    try:
        return await handler(ctx, request, caller)
    except NloraError as exc:
        ctx.admin_refusals.refused(request.url.path, caller, str(http_status_of(exc)[0]), exc, request.client)
        raise


async def _load(ctx: HttpContext, request: Request, admin: Principal) -> Response:
    body = await _admitted(ctx, request, admin, LoadLoraAdapter)
    if body is None:
        return Response(status_code=499)
    if body.is_3d_lora_weight:
        raise ParamError("is_3d_lora_weight=true is not supported: this server serves 2-D LoRA weights only",
                         "is_3d_lora_weight")
    name = body.lora_name
    ctx.config.check_adapter_name(name)
    served = {version.name for version in adapter_manager(ctx.engine).versions()}
    already = ParamError(f"the lora adapter {name!r} has already been loaded; to load a new version in place, "
                         "set 'load_inplace' to true", "lora_name")
    if not body.load_inplace and name in served:
        raise already
    start = time.perf_counter()
    try:  # and checked again as the version is switched to: concurrent loads of one new name, one wins
        version = await asyncio.to_thread(_register, ctx, name, body.lora_path, None if body.load_inplace else 0)
    except VersionConflict:
        raise already from None
    seconds = time.perf_counter() - start
    ctx.metrics.load.observe(seconds)
    log_done(log, request.url.path, admin.name, request.client,
             f"adapter {name!r} v{version.version} serving ({version.flavour}, rank {version.rank}) from "
             f"{shown(body.lora_path)!r} ({1e3 * seconds:.0f} ms)", adapter=name, adapter_version=version.version,
             duration_ms=round(1e3 * seconds))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(ctx: HttpContext, request: Request) -> Response:
    """``POST /v1/unload_lora_adapter``. Raises: as :func:`load_lora_adapter`; AdapterNotFound (404)
    for a name not served."""
    return await _refusals_logged(ctx, request, _unload)


async def _unload(ctx: HttpContext, request: Request, admin: Principal) -> Response:
    body = await _admitted(ctx, request, admin, UnloadLoraAdapter)
    if body is None:
        return Response(status_code=499)
    name = body.lora_name
    draining = adapter_manager(ctx.engine).draining(name)  # as gRPC's UnloadAdapter counts them
    # running requests finish on their version; in a worker thread, as gRPC's UnloadAdapter: the unload
    # waits for the registry's write lock, held by an upload's or swap's durable write
    version = await asyncio.to_thread(ctx.engine.unload_adapter, name)
    log_done(log, request.url.path, admin.name, request.client,
             f"adapter {name!r} v{version.version} unloaded ({draining} requests draining)", adapter=name,
             adapter_version=version.version, draining_requests=draining)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.",
                             headers={"X-Draining-Requests": str(draining)})


def _caller(ctx: HttpContext, request: Request) -> Principal:
    """Who sends an admin request: its key's principal, admin or not (refusals from here on are
    logged naming it: admin_log.py).

    Raises:
        RuntimeUpdatingOff: the server was started without the flag. Unauthenticated: no known key.
    """
    if not ctx.config.allow_runtime_lora_updating:
        raise RuntimeUpdatingOff(f"{request.url.path} is off on this server: start it with "
                                 f"--allow-runtime-lora-updating (or {ENV_FLAG}=true) to load adapters from its "
                                 "disk over HTTP, or use `nlora-serve adapters upload` / `unload` (gRPC)")
    return ctx.auth.authenticate(request.headers.items())


async def _admitted(ctx: HttpContext, request: Request, admin: Principal, kind: type[_Body]) -> _Body | None:
    """The checked body of ``admin``'s request (None: the client went away first).

    Raises:
        PermissionDenied: not an admin key. RequestValidationError, ParamError: the body.
            AdapterError: an invalid name.
    """
    admin.require_admin(request.url.path)
    try:
        raw = await read_body(request, ctx.admission)
    except ClientDisconnect:
        return None
    body = validated(kind, parsed_json(raw, request.headers.get("content-type")))
    for field in body.model_extra or {}:
        raise unsupported(field)
    validate_name(body.lora_name)
    return body


def _register(ctx: HttpContext, name: str, lora_path: str, if_version: int | None) -> AdapterVersion:
    """Register the folder ``lora_path`` as ``name``'s next version and return it (in a worker thread);
    ``if_version`` as :meth:`AdapterManager.register_dir` (0: only while ``name`` is not served).

    Raises:
        AdapterNotFound: no folder there (or a path the system cannot look up: too long).
            TooLarge: its adapter files over ``max_adapter_bytes`` together. AdapterError: the
            loader's refusal, or a Hugging Face name not in the cache. VersionConflict: see ``if_version``.
    """
    if not lora_path.strip():  # Path("") is ".": the server's working folder, never what was meant
        raise AdapterError("lora_path is empty; expected the path of an adapter folder on the server")
    try:  # Path.is_dir raises what it does not read as "missing": ENAMETOOLONG, EACCES on the way
        folder = local_or_hub(lora_path, AdapterError, "lora_path")
        why = None if folder.is_dir() else ""
        if folder.is_file():  # the folder's adapter_model.safetensors given for the folder
            raise AdapterError(f"lora_path {shown(lora_path)!r} is a file; expected the adapter folder that holds "
                               f"adapter_config.json and adapter_model.safetensors ({shown(str(folder.parent))!r}?)")
    except OSError as exc:
        why = f" ({exc.strerror or exc})"
    if why is not None:
        raise AdapterNotFound(f"lora_path {shown(lora_path)!r}: no such folder on the server{why}")
    total = sum((folder / file).stat().st_size for file in ALLOWED_FILES if (folder / file).is_file())
    if total > ctx.config.max_adapter_bytes:
        raise TooLarge(f"lora_path {shown(lora_path)!r}: {' + '.join(ALLOWED_FILES)} are {total} bytes, over the "
                       f"server's --max-adapter-bytes {ctx.config.max_adapter_bytes}")
    return adapter_manager(ctx.engine).register_dir(name, Path(folder), if_version)
