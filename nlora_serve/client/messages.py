"""Request messages the sync and asyncio clients share (pure functions over the proto)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from nlora_serve.proto import nlora_pb2 as pb

CHUNK_BYTES = 1 << 20  # upload chunk size: well under gRPC's default 4 MiB message limit
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``authorization: Bearer <key>`` (nothing without a key)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate_request(prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                     adapter: str | None = None, request_id: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest: ``prompt`` (text or token ids) or chat ``messages`` ({"role", "content"}).

    ``sampling`` takes the proto SamplingParams field names (max_tokens, min_tokens, temperature,
    top_p, top_k, seed, stop, stop_token_ids, ignore_eos, ...); unset temperature is greedy.

    Raises:
        ValueError: neither or both of prompt and messages, or an unknown sampling field.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text or token ids) and messages")
    req = pb.GenerateRequest(adapter=adapter or "", request_id=request_id,
                             sampling=pb.SamplingParams(**sampling))
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def upload_parts(name: str, adapter_dir: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES
                 ) -> Iterator[pb.UploadAdapterRequest]:
    """Header, then the safetensors file in chunks, for UploadAdapter.

    Raises:
        FileNotFoundError: the directory lacks adapter_config.json or adapter_model.safetensors.
    """
    folder = Path(adapter_dir)
    config = (folder / CONFIG_FILE).read_text()
    weights = folder / WEIGHTS_FILE
    size = weights.stat().st_size
    header = pb.UploadHeader(name=name, adapter_config_json=config, safetensors_bytes=size,
                             safetensors_sha256=_sha256(weights))
    yield pb.UploadAdapterRequest(header=header)
    with open(weights, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield pb.UploadAdapterRequest(chunk=chunk)


def swap_request(name: str, weights: bytes | str | os.PathLike, if_version: int | None = None
                 ) -> pb.SwapAdapterRequest:
    """A SwapAdapterRequest from safetensors bytes or a path to a .safetensors file of N keys."""
    data = weights if isinstance(weights, bytes) else Path(weights).read_bytes()
    req = pb.SwapAdapterRequest(name=name, n_safetensors=data)
    if if_version is not None:
        req.if_version = if_version
    return req


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()
