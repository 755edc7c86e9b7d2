"""Request messages the sync and asyncio clients share (pure functions over the proto)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from nlora_serve.client.types import InvalidInput
from nlora_serve.proto import nlora_pb2 as pb

CHUNK_BYTES = 1 << 20  # upload chunk size: well under gRPC's default 4 MiB message limit
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never sent: unpickling runs code
_UINT_MAX = {FieldDescriptor.TYPE_UINT32: (1 << 32) - 1, FieldDescriptor.TYPE_UINT64: (1 << 64) - 1}
# vLLM's "off" values the proto's unsigned fields cannot carry: sent as unset (the proto's "off")
_OFF_AS_UNSET = {"top_k": -1}


def check_api_key(api_key: str) -> str:
    """``api_key`` unchanged if gRPC metadata can carry it: printable ASCII (" " to "~").

    Raises:
        InvalidInput: another character (a newline, a non-ASCII letter, a control character); the
            message gives its position, never the key.
    """
    bad = next((i for i, c in enumerate(api_key) if not " " <= c <= "~"), None)
    if bad is not None:
        raise InvalidInput(f"API key must be printable ASCII (characters ' ' to '~'); character {bad + 1} "
                           f"of its {len(api_key)} is U+{ord(api_key[bad]):04X}")
    return api_key


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``authorization: Bearer <key>`` (nothing without a key).

    Raises:
        InvalidInput: from :func:`check_api_key`.
    """
    return (("authorization", f"Bearer {check_api_key(api_key)}"),) if api_key else ()


def generate_request(prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                     adapter: str | None = None, request_id: str = "", add_special_tokens: bool | None = None,
                     cache_salt: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest: ``prompt`` (text or token ids) or chat ``messages`` ({"role", "content"}).

    ``add_special_tokens``: whether the server adds the tokenizer's special tokens (a BOS) to a
    text prompt; None leaves it unset, which the server takes as true (vLLM's default).
    ``cache_salt``: the prefix-cache sharing group within the tenant (GenerateRequest.cache_salt,
    at most 1024 characters; "" = none). :meth:`NloraClient.generate` passes it on; it could not be
    sent before ("Protocol message SamplingParams has no "cache_salt" field").

    ``sampling`` takes the proto SamplingParams field names (max_tokens, min_tokens, temperature,
    top_p, top_k, seed, stop, stop_token_ids, ignore_eos, ...); an unset field takes the server's default
    (temperature: greedy unless its --generation-config sets one);
    top_k=-1 (vLLM's "off", as 0) is sent unset.

    Raises:
        InvalidInput: an unsigned field (max_tokens, seed, top_k, ...) out of its range.
        ValueError: neither or both of prompt and messages, or an unknown sampling field.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text or token ids) and messages")
    sampling = {k: v for k, v in sampling.items() if k not in _OFF_AS_UNSET or v != _OFF_AS_UNSET[k]}
    _check_unsigned(sampling)
    req = pb.GenerateRequest(adapter=adapter or "", request_id=request_id, cache_salt=cache_salt,
                             sampling=pb.SamplingParams(**sampling))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _check_unsigned(sampling: dict) -> None:
    """Name the field and the range instead of protobuf's bare "Value out of range"."""
    fields = pb.SamplingParams.DESCRIPTOR.fields_by_name
    for name, value in sampling.items():
        field = fields.get(name)
        top = _UINT_MAX.get(field.type) if field is not None else None
        if top is None:
            continue
        what = f"every {name} entry" if field.is_repeated else name
        for v in value if field.is_repeated else [value]:
            if isinstance(v, int) and not 0 <= v <= top:
                off = f" or {_OFF_AS_UNSET[name]} (off)" if name in _OFF_AS_UNSET else ""
                raise InvalidInput(f"{what} must be an integer in [0, {top}]{off}; got {v}")


def upload_parts(name: str, adapter_dir: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES
                 ) -> Iterator[pb.UploadAdapterRequest]:
    """Header, then the safetensors file in chunks, for UploadAdapter.

    The folder is checked here, before any call, not while gRPC iterates the parts.

    Raises:
        InvalidInput: the folder does not exist, or lacks adapter_config.json or
            adapter_model.safetensors (a pickled adapter_model.bin is named, never opened).
    """
    folder = Path(adapter_dir)
    config = _checked_config(folder)
    weights = folder / WEIGHTS_FILE
    size = weights.stat().st_size
    header = pb.UploadHeader(name=name, adapter_config_json=config, safetensors_bytes=size,
                             safetensors_sha256=_sha256(weights))
    return _parts(header, weights, chunk_bytes)


def _checked_config(folder: Path) -> str:
    """adapter_config.json's text from a folder checked to hold both upload files."""
    if not folder.is_dir():
        # h130: a file of the folder given for the folder, as `adapters swap` takes it
        also = f" (upload takes the folder that holds it: {folder.parent})" if folder.is_file() else ""
        raise InvalidInput(f"adapter folder {folder} {'is not a directory' if folder.exists() else 'does not exist'}"
                           f"{also}")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidInput(f"adapter folder {folder} has {', '.join(pickles)} but no {WEIGHTS_FILE}: pickle "
                               "files are never sent or opened (unpickling can run code); safetensors is "
                               f"required, save the adapter as {WEIGHTS_FILE}")
        raise InvalidInput(_no_file(folder, WEIGHTS_FILE))
    if not (folder / CONFIG_FILE).is_file():
        raise InvalidInput(_no_file(folder, CONFIG_FILE))
    try:
        return (folder / CONFIG_FILE).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {folder / CONFIG_FILE}: {exc}") from None


def _no_file(folder: Path, name: str) -> str:
    """Why ``folder/name`` is no upload file: missing, or there but no regular file (a FIFO or
    device, which reading would block on or never end, a folder, a link to nothing)."""
    path = folder / name
    if not os.path.lexists(path):
        return f"adapter folder {folder} has no {name}; an upload needs {CONFIG_FILE} and {WEIGHTS_FILE}"
    what = ("a link to nothing" if not path.exists() else "a folder" if path.is_dir()
            else "a FIFO, socket or device")
    return f"{path} is {what}, not a regular file; an upload needs {CONFIG_FILE} and {WEIGHTS_FILE} as files"


def _parts(header: pb.UploadHeader, weights: Path, chunk_bytes: int) -> Iterator[pb.UploadAdapterRequest]:
    yield pb.UploadAdapterRequest(header=header)
    with open(weights, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield pb.UploadAdapterRequest(chunk=chunk)


def swap_request(name: str, weights: bytes | str | os.PathLike, if_version: int | None = None
                 ) -> pb.SwapAdapterRequest:
    """A SwapAdapterRequest from safetensors bytes or a path to a .safetensors file of N keys.

    Raises:
        InvalidInput: ``if_version`` outside [0, 2^64 - 1] (the proto's uint64), the path is not a
            readable file, the payload names lora_A / lora_B tensors (a whole adapter, which the
            server refuses too).
    """
    top = _UINT_MAX[FieldDescriptor.TYPE_UINT64]
    if if_version is not None and not (isinstance(if_version, int) and 0 <= if_version <= top):
        raise InvalidInput(f"if_version must be an integer in [0, {top}]; got {if_version}")
    if isinstance(weights, bytes):
        data = weights
    else:
        path = Path(weights)
        if not path.is_file():
            inside = path / "adapter_model.safetensors"  # an adapter folder given for its file (h130)
            also = f" (the adapter folder's is {inside})" if inside.is_file() else ""
            raise InvalidInput(f"swap file {path} {'is not a file' if path.exists() else 'does not exist'}; "
                               f"expected a .safetensors file of lora_N keys{also}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read swap file {path}: {exc.strerror or exc}") from None
    full = _full_adapter_keys(data)
    if full:
        source = "swap payload" if isinstance(weights, bytes) else f"swap file {weights}"
        raise InvalidInput(f"{source} holds {full} weights, a whole adapter: a swap sends only N "
                           "(lora_N keys, e.g. the adapter_model.safetensors of `adapters tune` "
                           "or `adapters init --tied-form`); send a whole adapter with `adapters upload`")
    req = pb.SwapAdapterRequest(name=name, n_safetensors=data)
    if if_version is not None:
        req.if_version = if_version
    return req


def _full_adapter_keys(data: bytes) -> str:
    """"lora_A / lora_B" where ``data``'s safetensors header names such tensors, else "" (also for
    bytes that are not safetensors: the server's own check names what is wrong with those). A whole
    LoRA sent as a swap was refused as gRPC's bare "Received message larger than max" where it
    exceeded the server's receive limit, with no word of what the file is."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        keys = json.loads(data[8:8 + length]) if 0 < length <= len(data) - 8 else {}
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser: the server names it
        return ""
    if not isinstance(keys, dict):
        return ""
    kinds = sorted({k for k in ("lora_A", "lora_B") for key in keys if f".{k}." in str(key)})
    return " / ".join(kinds)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()
