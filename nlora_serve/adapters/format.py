"""Adapter directory reading: safetensors in (writing.py writes them). A pickle is never opened.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT layout).
Adapter files are read into memory with read(2) (file_read.py: never memory-mapped, never a FIFO
or device opened) and parsed from bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, deserialize
from safetensors.torch import load

from nlora_serve.adapters.config import CONFIG_NAME, check_adapter_dir
from nlora_serve.adapters.file_read import WEIGHTS_FILE, open_regular
from nlora_serve.errors import AdapterError

WEIGHTS_NAME = WEIGHTS_FILE
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype names we accept; each converts exactly to float32.
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LITTLE_ENDIAN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # safetensors byte order
# Caps on a safetensors header, checked before the JSON is parsed / before any entry is looked at
# (a 50 MB __metadata__, or 500,000 keys, which took 15 s to parse and refuse). An adapter has at most
# 4 parts x 7 projections a layer (3584 tensors, a ~540 KB header at 128 layers); 256 bytes an entry.
MAX_TENSORS = 8192
MAX_HEADER_BYTES = MAX_TENSORS * 256  # 2 MiB


def weights_path(adapter_dir: Path) -> Path:
    """``adapter_dir/adapter_model.safetensors``.

    Raises:
        AdapterError: the directory is missing, or holds no safetensors file (a pickled
            ``adapter_model.bin``/``.pt`` is named and refused without being opened), or its
            ``adapter_model.safetensors`` is no regular file (a folder, FIFO, a link to nothing).
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if path.is_file():
        return path
    if os.path.lexists(path):  # was "no adapter_model.safetensors", beside the folder or FIFO of that name
        what = "a folder" if path.is_dir() else "a link to nothing" if not path.exists() else "a FIFO, socket or device"
        raise AdapterError(f"{path}: not a regular file ({what}); expected a safetensors file")
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"{adapter_dir}: found only {', '.join(pickles)} (a pickle, which can run code "
                           f"when loaded); only {WEIGHTS_NAME} (safetensors) is loaded, pickles are never "
                           "opened: convert it with safetensors.torch.save_file")
    raise AdapterError(f"{adapter_dir}: no {WEIGHTS_NAME}; expected it next to {CONFIG_NAME}")


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (safetensors dtype, shape)}`` of safetensors file ``path``, from its first 8 bytes
    and the header they announce (read(2), not mapped; the tensor data is not read or checked:
    file_read.read_file and :func:`read_bytes` do that).

    Raises:
        AdapterError: naming ``path``: unreadable, not a safetensors header, over the caps on
            a header, or a tensor of a dtype other than F32 / F16 / BF16 (named with its key).
    """
    try:
        with open(open_regular(path, "a safetensors file"), "rb") as f:
            data = f.read(8)
            length = int.from_bytes(data, "little") if len(data) == 8 else 0
            data += f.read(min(length, MAX_HEADER_BYTES))  # a longer one is refused unread
    except OSError as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc.strerror or exc})") from None
    return {k: (v["dtype"], v["shape"]) for k, v in _entries(data, str(path))[0].items()}


def _check_dtypes(header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    for key, (dtype, _) in header.items():
        if not isinstance(dtype, str) or dtype not in STORED_DTYPES:  # a list or object is no dtype name
            dtype = dtype if isinstance(dtype, str) else f"{dtype!r:.80}"
            raise AdapterError(f"tensor {key!r} has dtype {dtype}; expected one of "
                               f"{', '.join(STORED_DTYPES)} (float16, bfloat16, float32)")


def read_header_bytes(data: bytes, source: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """:func:`read_header` for safetensors bytes in memory (an upload or a swap payload).
    See :func:`read_bytes` for the header and the tensors in one parse.

    Format: 8-byte little-endian header length, then that many bytes of JSON
    ``{key: {"dtype", "shape", "data_offsets"}}`` (plus optional ``__metadata__``).

    Raises:
        AdapterError: not safetensors, or a tensor of a dtype other than F32 / F16 / BF16;
            the message names ``source`` (the file read) when given.
    """
    return {k: (v["dtype"], v["shape"]) for k, v in _entries(data, source)[0].items()}


def _too_short(what: str, size: int) -> str:
    """Why ``size`` bytes (< 8) of ``what`` cannot be safetensors."""
    got = "empty (0 bytes)" if size == 0 else f"{size} bytes, too short"
    return (f"{what} is {got}; expected a safetensors file: an 8-byte little-endian header length, "
            "a JSON header, then the tensor data")


def _entries(data: bytes, source: str | None = None) -> tuple[dict[str, dict], int]:
    """The header's tensor entries (``shape`` as a tuple, dtypes checked) and where the data starts.
    Errors name ``source`` (a file's path) when given."""
    if len(data) < 8:
        raise AdapterError(_too_short(source or WEIGHTS_NAME, len(data)))
    size = int.from_bytes(data[:8], "little")
    try:
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header length over the {MAX_HEADER_BYTES}-byte limit on an adapter's header")
        if not 0 < size <= len(data) - 8:
            shown = f" {size}" if size <= len(data) else ""  # a larger one is 8 bytes of text, maybe a secret
            raise ValueError(f"header length{shown} does not fit {len(data)} bytes")
        meta = json.loads(data[8:8 + size])
        if not isinstance(meta, dict):
            raise ValueError(f"the header is a JSON {_json_kind(meta)}; expected an object of tensor entries")
        if (count := len(meta) - ("__metadata__" in meta)) > MAX_TENSORS:
            raise ValueError(f"{count} tensors, over the limit of {MAX_TENSORS} on an adapter's tensors")
        entries = {k: _entry(k, v) for k, v in meta.items() if k != "__metadata__"}
        bad = next((k for k, v in entries.items() if not all(type(d) is int and d >= 0 for d in v["shape"])), None)
        if bad is not None:
            raise ValueError(f"tensor {bad!r} has shape {list(entries[bad]['shape'])}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise AdapterError(f"{_unreadable(source)} ({exc})") from None
    _check_dtypes({k: (v["dtype"], v["shape"]) for k, v in entries.items()})
    return entries, 8 + size


def _json_kind(value: object) -> str:
    """JSON's name for the type of a parsed ``value`` (an error names what it got)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _entry(key: str, value: object) -> dict:
    """Header entry ``key``'s dtype, shape (a tuple) and data_offsets; a ValueError naming the key
    and the field when the entry is no object, lacks a field or has a shape that is no array (these
    were Python's own words: "'int' object is not subscriptable", "'int' object is not iterable")."""
    if not isinstance(value, dict):
        raise ValueError(f"tensor {key!r} has a JSON {_json_kind(value)} as its entry; expected an object "
                         "with dtype, shape and data_offsets")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in value]
    if missing:
        raise ValueError(f"tensor {key!r} has no {', '.join(missing)}; expected an object with dtype, shape and "
                         "data_offsets")
    if not isinstance(value["shape"], list):
        raise ValueError(f"tensor {key!r} has a JSON {_json_kind(value['shape'])} as its shape; expected an array "
                         "of sizes")
    return {"dtype": value["dtype"], "shape": tuple(value["shape"]), "data_offsets": value["data_offsets"]}


def read_bytes(data: bytes, source: str | None = None) -> tuple[dict[str, tuple[str, tuple[int, ...]]],
                                                                 dict[str, torch.Tensor]]:
    """(header, tensors) of safetensors bytes: the header checked first, then one full parse
    (which also checks that offsets and sizes agree with it; the tensors are copies in memory).

    Raises:
        AdapterError: as :func:`read_header_bytes`, or data that does not match its header
            (a file cut short); the message names ``source`` (the file read) when given.
    """
    header = read_header_bytes(data, source)
    try:
        return header, load(data)
    except (ValueError, SafetensorError) as exc:
        raise AdapterError(f"{_unreadable(source)} ({exc})") from None


def _unreadable(source: str | None) -> str:
    """The start of a parse error's message, naming ``source`` (a file's path) when given."""
    return f"{source}: not a readable safetensors file" if source else \
        "adapter weights are not a readable safetensors file"


def read_stacked(data: bytes, keys: list[str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], np.ndarray | None]:
    """(header, stacked): the header as :func:`read_header_bytes` gives it, and ``keys``' tensors
    as one float32 numpy array ``[len(keys), *shape]`` in that order, decoded in a few numpy
    operations however many keys there are (the hot-swap path, DESIGN §9). numpy, not torch: a
    torch op over this many elements would fan out over torch's intra-op threads, which on a busy
    server compete with the engine's own parallel ops for the same cores.

    ``stacked`` is None unless the layout is the common one: ``keys`` are exactly the file's keys
    and every tensor has one dtype and one shape (use :func:`read_bytes` then). Like safetensors'
    own loader, checks that the tensors' ``data_offsets`` tile the data exactly (no gap, no
    overlap, each the size its dtype and shape say). Decoding is exact for F32, F16 and BF16.
    ``data`` is also parsed by safetensors itself (0.3 ms for 210 tensors of 16 x 16), which is
    what reads it back from the store at a restart: Python's json takes headers that parser
    refuses (UTF-16, a BOM, NaN, non-string ``__metadata__`` values, nesting past 127), and such a
    hot-swap had served until the restart, which then dropped the tenant.

    Raises:
        AdapterError: as :func:`read_header_bytes`, or offsets that do not match the header.
    """
    entries, start = _entries(data)
    header = {k: (v["dtype"], v["shape"]) for k, v in entries.items()}
    if not keys or set(entries) != set(keys) or len(set(header.values())) != 1:
        return header, None
    name, shape = header[keys[0]]
    size = math.prod(shape) * _LITTLE_ENDIAN[name].itemsize  # bytes per tensor
    if size == 0:
        return header, None
    _check_tiling(entries, len(data) - start, size)
    try:
        deserialize(data)
    except SafetensorError as exc:
        raise AdapterError(f"adapter weights are not a readable safetensors file ({exc})") from None
    rows = np.frombuffer(data, dtype=np.uint8, offset=start).reshape(-1, size)
    picked = rows[[entries[k]["data_offsets"][0] // size for k in keys]]  # [K, size] bytes, key order
    return header, _as_float32(picked.view(_LITTLE_ENDIAN[name]), name).reshape(len(keys), *shape)


def _as_float32(values: np.ndarray, name: str) -> np.ndarray:
    """Stored values (as their little-endian numpy type; BF16 as its uint16 bits) as float32."""
    if name == "BF16":  # bfloat16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def _check_tiling(entries: dict[str, dict], length: int, size: int) -> None:
    """Each entry's ``data_offsets`` span ``size`` bytes, and together they tile ``length`` bytes."""
    spans = []
    for key, entry in entries.items():
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise AdapterError(f"adapter weights are not a readable safetensors file (tensor {key!r} has "
                               f"data_offsets {offsets!r}; expected two integers)")
        spans.append((*offsets, key))
    spans.sort()
    end = 0
    for begin, stop, key in spans:
        if begin != end or stop - begin != size:
            raise AdapterError(f"adapter weights are not a readable safetensors file (tensor {key!r} has "
                               f"data_offsets [{begin}, {stop}]; expected [{end}, {end + size}])")
        end = stop
    if end != length:
        raise AdapterError(f"adapter weights are not a readable safetensors file (the tensors cover {end} "
                           f"bytes of data, the file has {length})")
