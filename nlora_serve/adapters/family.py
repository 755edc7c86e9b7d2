"""Compressed families on disk: shared A_f, B_f written once, one N-only folder per member.

A family (``adapters compress``, see compress/basis.py) is a set of adapters that share A_f [R, in] and
B_f [out, R] at every site and differ only in N [R, R] (the scaling folded in: s = 1). Layout,
in a store root or in the folder ``compress --out`` writes::

    _families/<key>/family.safetensors     lora_A / lora_B keys of every site (float32), once
    <member>/adapter_config.json           PEFT fields (r = lora_alpha = R) + nlora_serve
                                           {format: "family-n", family: <key>, base_fingerprint}
    <member>/adapter_model.safetensors     lora_N keys only (the compact family form)

``_families`` can never be an adapter name (names start with a letter or digit). The family key
is the sha256 of the factors' float32 bytes and the base fingerprint, so a member whose factors
are missing or were changed is refused at load, never served against the wrong basis. A member
may also travel in the full form (lora_A = A_f, lora_N, lora_B = B_f, same config): that is what
an upload sends, and the registry stores it compact, writing the factors once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from nlora_serve.adapters.store import durable, factors as store_factors
from nlora_serve.adapters.config import FAMILY_FORMAT
from nlora_serve.adapters.format import read_bytes
from nlora_serve.adapters.writing import Undo, atomic_write, make_dirs
from nlora_serve.adapters.keys import PART_A, PART_B, PART_N, group_keys, tensor_key
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.adapters.store.layout import FACTORS_FILE, FAMILIES
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import ModelSpec

FAMILIES_DIR = FAMILIES  # the store (store/reads.py) skips it when listing adapter names


@dataclass(frozen=True, slots=True)
class FamilyFactors:
    """The shared factors of one family: per site A_f [R, in] and B_f [out, R], float32, CPU."""

    key: str  # 64 hex chars, see factors_key
    base_fingerprint: str  # the base model the family was compressed for
    rank: int  # R
    sites: dict  # (layer, module) -> (A_f, B_f)
    _cast: dict = field(default_factory=dict, repr=False, compare=False)  # dtype -> sites in it

    def in_dtype(self, dtype: torch.dtype) -> dict:
        """The sites cast to ``dtype``, made once per dtype: every member shares these tensors."""
        if dtype not in self._cast:
            self._cast[dtype] = {s: (a.to(dtype), b.to(dtype)) for s, (a, b) in self.sites.items()}
        return self._cast[dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of every factor (held once per family, whatever the member count)."""
        return sum(a.numel() * 4 + b.numel() * 4 for a, b in self.sites.values())


def factors_key(sites: dict, base_fingerprint: str) -> str:
    """sha256 hex over the base fingerprint and each site's (layer, module, shapes, float32 bytes)."""
    h = hashlib.sha256(f"nlora-family-v1|base={base_fingerprint}\n".encode())
    for (layer, module), (a, b) in sorted(sites.items()):
        h.update(f"{layer}|{module}|{tuple(a.shape)}|{tuple(b.shape)}\n".encode())
        for t in (a, b):
            h.update(np.ascontiguousarray(t.detach().to(torch.float32).numpy()).tobytes())
    return h.hexdigest()


def make_factors(sites: dict, base_fingerprint: str) -> FamilyFactors:
    """FamilyFactors from float tensors (cast to float32 first, so the key hashes what is stored)."""
    sites = {s: (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()) for s, (a, b) in sites.items()}
    rank = {a.shape[0] for a, _ in sites.values()}
    if len(rank) != 1:
        raise AdapterError(f"a family has one rank R at every site; got ranks {sorted(rank)}")
    return FamilyFactors(factors_key(sites, base_fingerprint), base_fingerprint, rank.pop(), sites)


def factors_bytes(factors: FamilyFactors) -> bytes:
    """The safetensors bytes of ``family.safetensors``."""
    tensors = {}
    for (layer, module), (a, b) in factors.sites.items():
        tensors[tensor_key(layer, module, PART_A)] = a
        tensors[tensor_key(layer, module, PART_B)] = b
    meta = {"format": "pt", "family": factors.key, "base_fingerprint": factors.base_fingerprint}
    return safetensors.torch.save(tensors, metadata=meta)


def parse_factors(data: bytes, spec: ModelSpec, key: str, source: str) -> FamilyFactors:
    """Read ``family.safetensors`` bytes and check they hash to ``key``.

    Raises:
        AdapterError: unreadable, a site without both factors, or a key mismatch.
    """
    _, tensors = read_bytes(data)  # checks the header and the tiling first
    # the fingerprint is part of what the key hashes, so a forged one fails the key check below
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    fingerprint = str((header.get("__metadata__") or {}).get("base_fingerprint", ""))
    sites = {}
    for site, parts in group_keys(list(tensors), spec).items():
        if set(parts) != {PART_A, PART_B}:
            raise AdapterError(f"{source}: family factors of {ModelSpec.module_path(*site)} need lora_A and lora_B; "
                               f"found {sorted(parts)}")
        a, b = tensors[parts[PART_A]], tensors[parts[PART_B]]
        _check_factor_shapes(site, a, b, spec, source)
        sites[site] = (a.to(torch.float32), b.to(torch.float32))
    factors = make_factors(sites, fingerprint)
    if factors.key != key:
        raise AdapterError(f"{source}: the family factors hash to {factors.key[:16]}…, not to the family "
                           f"{key[:16]}… the adapter names: they were changed or belong to another family")
    return factors


def _check_factor_shapes(site: tuple[int, str], a: torch.Tensor, b: torch.Tensor, spec: ModelSpec,
                         source: str) -> None:
    """A_f [R, in] and B_f [out, R] of one site, as the model's projection and one R: factors of
    another shape (the key hashes whatever the file holds) were served, and every step that ran
    the member failed, ending every running request of every tenant.

    Raises:
        AdapterError: naming the site, both shapes and the projection's [out, in].
    """
    out, inp = spec.projection_shape(site[1])
    rank = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or tuple(a.shape) != (rank, inp) or tuple(b.shape) != (out, rank) or rank < 1:
        raise AdapterError(f"{source}: family factors of {ModelSpec.module_path(*site)} have lora_A "
                           f"{list(a.shape)} and lora_B {list(b.shape)}; expected [R, {inp}] and [{out}, R] "
                           f"({site[1]} of this model is [out={out}, in={inp}])")


def family_file(root: Path, key: str) -> Path:
    """``root/_families/<key>/family.safetensors`` (``key`` checked to be 64 hex chars)."""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise AdapterError(f"family key {key!r:.80} is not 64 lowercase hex characters")
    return Path(root) / FAMILIES_DIR / key / FACTORS_FILE


def write_factors(root: Path, factors: FamilyFactors, undo: Undo | None = None) -> Path:
    """Write the factors under ``root`` once (atomic: temp file, fsync, rename); a no-op when the
    family is already there. Returns the file's path. For an output folder (``compress --out``);
    into an adapter store they go through :func:`store_factors.write_factors` (durable order).

    Args:
        undo: where to record what was created (the command's other output fails: removed again).

    Raises:
        OSError: the folder or the file cannot be written (the caller names its context).
    """
    path = family_file(root, factors.key)
    if path.is_file():
        return path
    data = factors_bytes(factors)
    mine = Undo()
    with mine:
        make_dirs(path.parent, mine)
        try:
            atomic_write(path, lambda p: Path(p).write_bytes(data), replace=False)
        except FileExistsError:
            pass  # another writer put the same factors there meanwhile (the key hashes them): theirs
        else:
            mine.created(path)
    if undo is not None:
        undo.adopt(mine)
    return path


class FamilyResolver:
    """Finds family factors by key, and keeps one copy per family while registered members use it.

    Looks under each of ``roots`` (a store root), then, for a member read from a folder, next to
    it: ``<folder>/../_families`` and ``<folder>/../../_families`` (a store version folder).
    A factors file over ``max_bytes`` (--max-adapter-bytes) is refused before it is read.

    The cache holds exactly the families of the members :meth:`hold` admitted and :meth:`let_go`
    has not freed (counted per member version): a read alone caches nothing, so a member the
    reader or the registry refused (bounds, pool full, disk error) leaves nothing behind, and a
    family whose last member is unloaded or replaced is dropped with it. Thread-safe.
    """

    def __init__(self, spec: ModelSpec, roots: tuple[Path, ...] = (), max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES):
        self.spec = spec
        self.roots = tuple(Path(r) for r in roots)
        self.max_bytes = max_bytes
        self._cache: dict[str, FamilyFactors] = {}  # the families of admitted members only
        self._users: Counter = Counter()  # key -> admitted member versions using it
        self._lock = threading.Lock()

    def get(self, key: str, near: Path | None = None) -> FamilyFactors:
        """The factors of family ``key``: the registered members' copy, else read (not cached).

        Raises:
            AdapterError: not found anywhere searched (the message lists where), or mismatched.
        """
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        places = list(self.roots) + ([Path(near).parent, Path(near).parent.parent] if near is not None else [])
        for root in places:
            path = family_file(root, key)
            try:  # no link followed below the root: a store's _families is the store's, link-free
                found = durable.read_folder(root, path.parent.relative_to(root), (FACTORS_FILE,), self.max_bytes)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if found:
                return parse_factors(found[FACTORS_FILE], self.spec, key, str(path))
        searched = ", ".join(str(Path(p) / FAMILIES_DIR) for p in places) or "nowhere (no store)"
        raise AdapterError(f"family {key[:16]}…: its shared factors ({FAMILIES_DIR}/{key}/{FACTORS_FILE}) are "
                           f"missing; searched {searched}. Copy the family folder with its members, or "
                           "upload the member in the full form (`adapters compress --full-form`)")

    def known(self, factors: FamilyFactors) -> FamilyFactors:
        """The registered members' copy of ``factors``' family, else ``factors`` itself (not cached)."""
        with self._lock:
            return self._cache.get(factors.key, factors)

    def hold(self, adapter) -> None:
        """A member version is admitted: its family's factors stay cached until :meth:`let_go` of
        every member version holding them. A member read before another of its family was
        admitted (two uploads at once) is re-pointed to the cached copy, so the family is held
        once. No-op for an adapter that is no family member."""
        factors = getattr(adapter, "family_factors", None)
        if factors is None:
            return
        with self._lock:
            kept = self._cache.setdefault(factors.key, factors)
            self._users[factors.key] += 1
        if kept is not factors:  # equal values (the key hashes them): share the cached tensors
            cast = kept.in_dtype(adapter.dtype)
            for site, w in adapter.sites.items():
                w.A, w.B = cast[site]
            adapter.family_factors = kept

    def let_go(self, key: str | None) -> None:
        """A member version of family ``key`` (held by :meth:`hold`) is freed; the factors leave
        the cache with the last one. No-op for None or a key no member holds."""
        with self._lock:
            if self._users.get(key, 0) <= 0:
                return
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                self._cache.pop(key, None)

    def cached(self) -> set[str]:
        """Keys of the families held now (for tests and diagnostics)."""
        with self._lock:
            return set(self._cache)


def member_header(key: str, base_fingerprint: str) -> dict:
    """The ``nlora_serve`` object of a family member's adapter_config.json."""
    return {"format": FAMILY_FORMAT, "family": key, "base_fingerprint": base_fingerprint}


def compact_family_files(name: str, adapter, weights: bytes, store: AdapterStore) -> dict[str, bytes] | None:
    """Store files of an uploaded full-form family member registered as ``name``: its lora_N keys
    as uploaded (so the compact form hashes and serves exactly like the upload) and its config;
    the family's factors are written durably into ``store`` first, once. None when ``adapter`` is
    not a family member or the upload is already compact (its factors were found in the store
    when it was read).

    Raises:
        StoreWriteError: the store's disk refused the factors (nothing of them is left).
    """
    if getattr(adapter, "shared_family", None) is None:  # (test doubles of Adapter lack the field)
        return None
    tensors = safetensors.torch.load(weights)
    if not any(k.endswith(PART_A) for k in tensors):
        return None
    # the float32 factors the key hashes: A, B of the sites are cast to the server's dtype, and on a
    # bfloat16 server factors rebuilt from them hashed to another key than the config names
    factors = getattr(adapter, "family_factors", None)
    if factors is None:
        factors = make_factors({s: (w.A, w.B) for s, w in adapter.sites.items()}, adapter.base_fingerprint)
    store_factors.write_factors(store, name, factors.key, lambda: factors_bytes(factors))
    config = {k: v for k, v in adapter.config.raw.items() if k != "nlora_serve"}
    config["nlora_serve"] = member_header(adapter.shared_family, adapter.base_fingerprint)
    n_keys = {k: v.contiguous() for k, v in tensors.items() if k.endswith(PART_N)}
    return {"adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
            "adapter_model.safetensors": safetensors.torch.save(n_keys, metadata={"format": "pt"})}


def import_family(name: str, adapter_dir: Path, resolver: FamilyResolver, store: AdapterStore) -> None:
    """Before a compact member folder is registered into ``store`` as ``name``: copy its family's
    factors (found next to the folder) into the store durably, once. A no-op for other adapters.

    Raises:
        AdapterError: the member's factors are missing or mismatched.
        StoreWriteError: the store's disk refused them.
    """
    config = Path(adapter_dir) / "adapter_config.json"
    try:
        header = json.loads(config.read_text()).get("nlora_serve")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # the reader names what is wrong with the folder
    if isinstance(header, dict) and header.get("format") == FAMILY_FORMAT and isinstance(header.get("family"), str):
        factors = resolver.get(header["family"], near=Path(adapter_dir))
        store_factors.write_factors(store, name, factors.key, lambda: factors_bytes(factors))
