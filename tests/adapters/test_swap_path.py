"""The hot-swap fast path (DESIGN §9): stacked decoding, the durable write's minimum of fsyncs, the
shared config file, crash consistency, compare-and-swap under a race, and the pool write in pieces.

References are independent: safetensors' own reader, the full adapter reader on the same files, a
float64 s·N, hand-listed fsync targets.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nlora_serve.adapters.format import read_stacked
from nlora_serve.adapters.loader import read_adapter, read_adapter_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.runtime.version import AdapterVersion, VersionConflict
from nlora_serve.adapters.runtime.residency import Residency
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.store import CONFIG_FILE, STAGING, WEIGHTS_FILE
from nlora_serve.adapters.runtime.swap import replace_n
from nlora_serve.errors import AdapterError

KEYS = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_N.weight" for i in range(7)]


def _raw_file(entries: dict[str, tuple[str, list[int], list[int]]], data: bytes) -> bytes:
    """A safetensors file written by hand: {key: (dtype, shape, data_offsets)} and the data."""
    header = json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()})
    header += " " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header.encode() + data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stacked_read_equals_safetensors_own_reader(dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(5, 5, generator=gen) * 10 ** i).to(dtype) for i, k in enumerate(KEYS)}
    data = safetensors.torch.save(tensors)
    order = KEYS[3:] + KEYS[:3]
    header, stacked = read_stacked(data, order)
    want = safetensors.torch.load(data)
    assert header == {k: ({torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype], (5, 5))
                      for k in KEYS}
    assert torch.equal(torch.from_numpy(stacked), torch.stack([want[k].to(torch.float32) for k in order]))


def test_stacked_read_leaves_mixed_layouts_to_the_full_reader():
    mixed_dtype = {k: torch.zeros(4, 4, dtype=torch.float16 if i == 2 else torch.float32) for i, k in enumerate(KEYS)}
    mixed_shape = {k: torch.zeros(4 + (i == 2), 4 + (i == 2)) for i, k in enumerate(KEYS)}
    for tensors in (mixed_dtype, mixed_shape):
        header, stacked = read_stacked(safetensors.torch.save(tensors), KEYS)
        assert stacked is None and set(header) == set(KEYS)
    assert read_stacked(safetensors.torch.save({k: torch.zeros(2, 2) for k in KEYS}), KEYS[1:])[1] is None


@pytest.mark.parametrize("offsets, message", [
    ([[0, 16], [8, 24]], r"data_offsets \[8, 24\]; expected \[16, 32\]"),  # overlap
    ([[0, 16], [24, 40]], r"data_offsets \[24, 40\]; expected \[16, 32\]"),  # gap
    ([[0, 16], [16, 32]], r"cover 32 bytes of data, the file has 40"),  # trailing bytes
    ([[0, 16], [16, "x"]], r"expected two integers"),
])
def test_stacked_read_refuses_offsets_safetensors_refuses(offsets, message):
    entries = {KEYS[0]: ("F32", [2, 2], offsets[0]), KEYS[1]: ("F32", [2, 2], offsets[1])}
    data = _raw_file(entries, bytes(40))
    with pytest.raises(Exception):
        safetensors.torch.load(data)  # the reference reader refuses it too
    with pytest.raises(AdapterError, match=message):
        read_stacked(data, KEYS[:2])


@pytest.fixture
def tenant(base_fp32, tmp_path):
    adapter = init_adapter(base_fp32, rank=4, targets=["q_proj", "down_proj"], layers=[0, 7])
    return write_adapter(adapter, tmp_path / "t", tied_form=True)


def _payload(path, scale: float, dtypes=()) -> bytes:
    n = safetensors.torch.load_file(path / WEIGHTS_FILE)
    return safetensors.torch.save({k: (t * scale).to(dtypes[i] if i < len(dtypes) else t.dtype).contiguous()
                                   for i, (k, t) in enumerate(sorted(n.items()))})


@pytest.mark.parametrize("dtypes", [(torch.float16,), (torch.bfloat16,) * 4], ids=["mixed", "bf16"])
def test_swap_payload_in_other_dtypes_equals_a_full_read(base_fp32, tenant, dtypes):
    payload = _payload(tenant, 1.25, dtypes)
    fast = replace_n(read_adapter(tenant, base_fp32), payload)
    full = read_adapter_bytes((tenant / CONFIG_FILE).read_bytes(), payload, base_fp32)
    assert fast.content_hash == full.content_hash and fast.stored_dtype == full.stored_dtype
    for site, want in full.sites.items():
        assert torch.equal(fast.sites[site].N, want.N)


def test_swap_on_a_bfloat16_server_equals_a_full_read(base_model_dir, tmp_path):
    from nlora_serve.models import load_base

    base = load_base(str(base_model_dir), torch.bfloat16)
    path = write_adapter(init_adapter(base, rank=16, targets="all-linear"), tmp_path / "t", tied_form=True)
    payload = _payload(path, 1.5)  # 210 sites · 256: cast in more than one piece
    fast = replace_n(read_adapter(path, base), payload)
    full = read_adapter_bytes((path / CONFIG_FILE).read_bytes(), payload, base)
    assert fast.content_hash == full.content_hash
    for site, want in full.sites.items():
        assert fast.sites[site].N.dtype == torch.bfloat16 and torch.equal(fast.sites[site].N, want.N)


def _fsync_targets(monkeypatch, together: int = 0) -> list[str]:
    """The paths fsynced from now on, in the order their fsyncs began; the first ``together`` of them
    must be in flight at once (each waits at a barrier for the others: fsyncs issued in turn time out)."""
    seen, real, lock = [], os.fsync, threading.Lock()
    barrier = threading.Barrier(together, timeout=5) if together else None

    def fsync(fd):
        with lock:
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
            waits = len(seen) <= together
        if waits:
            barrier.wait()
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_swap_writes_the_durable_minimum_and_shares_the_config(base_fp32, tenant, tmp_path, monkeypatch):
    manager = AdapterManager(base_fp32, tmp_path / "store")
    v1 = manager.register_dir("acme", tenant)
    held = manager.acquire("acme")  # keeps v1's folder on disk through the swap
    seen = _fsync_targets(monkeypatch, together=3)
    v2 = manager.swap("acme", _payload(tenant, 2.0), if_version=1)
    monkeypatch.undo()
    store = tmp_path / "store"
    # weights file, its SHA256SUMS and their (staged) folder at once (one journal commit), then the
    # adapter folder holding the renamed version
    staged = next(p for p in seen if p.endswith(WEIGHTS_FILE)).removesuffix(f"/{WEIGHTS_FILE}")
    assert f"/{STAGING}/acme." in staged and len(seen) == 4
    assert sorted(seen[:3]) == sorted([f"{staged}/{WEIGHTS_FILE}", f"{staged}/SHA256SUMS", staged])
    assert seen[3] == str(store / "acme")
    assert os.stat(v2.path / CONFIG_FILE).st_ino == os.stat(v1.path / CONFIG_FILE).st_ino  # a hard link
    manager.release(held)
    manager.registry.store.wait_deleted()  # the old folder's files are gone too
    assert manager.registry.store.versions("acme") == [2] and os.listdir(store / STAGING) == []
    assert (v2.path / CONFIG_FILE).read_bytes() == (tenant / CONFIG_FILE).read_bytes()
    restarted = AdapterManager(base_fp32, store).registry.get("acme")
    assert (restarted.version, restarted.content_hash) == (2, v2.content_hash)


def test_crash_during_a_swap_leaves_the_old_version_serving_and_on_disk(base_fp32, tenant, tmp_path, monkeypatch):
    manager = AdapterManager(base_fp32, tmp_path / "store")
    v1 = manager.register_dir("acme", tenant)

    def power_cut(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "rename", power_cut)
    with pytest.raises(OSError, match="power cut"):
        manager.swap("acme", _payload(tenant, 2.0))
    monkeypatch.undo()
    assert manager.registry.get("acme") is v1 and v1.pool.used == 1  # the new version's slot given back
    assert os.listdir(tmp_path / "store" / STAGING) == []
    restarted = AdapterManager(base_fp32, tmp_path / "store").registry.get("acme")
    assert (restarted.version, restarted.content_hash) == (1, v1.content_hash)


def test_swap_revalidates_when_another_registration_switches_first(base_fp32, tenant, tmp_path):
    manager = AdapterManager(base_fp32, tmp_path / "store")
    manager.register_dir("acme", tenant)
    config = (tenant / CONFIG_FILE).read_bytes()
    raced, scale = [], [3.0]

    def racing(current, weights):  # an upload lands while the swap validates against v1
        if not raced:
            raced.append(manager.register("acme", {CONFIG_FILE: config, WEIGHTS_FILE: _payload(tenant, scale[0])}))
        return replace_n(current, weights)

    payload = _payload(tenant, 2.0)
    with pytest.raises(VersionConflict, match="expected current version 1, have 2"):
        manager.registry.swap_weights("acme", payload, if_version=1, validate=racing)
    raced.clear()
    scale[0] = 4.0  # other content: v2's again would be v2, no version written (registry._commit)
    v4 = manager.registry.swap_weights("acme", payload, validate=racing)  # v3 raced in; checked against it
    assert v4.version == 4 and v4.content_hash == read_adapter_bytes(config, payload, base_fp32).content_hash


def _rewritten_header(payload: bytes, edit) -> bytes:
    """``payload`` with its JSON header replaced by ``edit(header dict) -> header bytes`` (padded
    with spaces to a multiple of 8, as safetensors writes it); the data is kept."""
    size = int.from_bytes(payload[:8], "little")
    header = edit(json.loads(payload[8:8 + size]))
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + payload[8 + size:]


def _with_metadata(meta: str):  # ``meta`` is spliced in as JSON text
    return lambda h: ('{"__metadata__": ' + meta + ", " + json.dumps(h)[1:]).encode()


def _nested_field(depth: int):  # an extra field in one entry, nested ``depth`` deep
    def edit(h):
        first = next(iter(h))
        return json.dumps(h).replace(f'"{first}": {{', f'"{first}": {{"x": {"[" * depth}{"]" * depth}, ', 1).encode()
    return edit


# Headers Python's json reads and safetensors' own (serde) parser refuses: the stacked swap path
# parsed only with the former, stored such a payload as the new version's file, and the restart
# (which reads the store with safetensors) then refused it and no longer served the tenant.
UNREADABLE_HEADERS = {
    "utf-16": lambda h: (json.dumps(h) + " " * (-len(json.dumps(h)) % 4)).encode("utf-16-le"),  # no byte padding
    "utf-8 BOM": lambda h: b"\xef\xbb\xbf" + json.dumps(h).encode(),
    "metadata int": _with_metadata('{"step": 60}'),
    "metadata list": _with_metadata("[1]"),
    "metadata NaN": _with_metadata('{"loss": NaN}'),
    "nested 200": _nested_field(200),
}
# ... and headers both read: these stay accepted
READABLE_HEADERS = {
    "metadata str": _with_metadata('{"step": "60"}'),
    "metadata null": _with_metadata("null"),
    "extra field": _nested_field(1),
}


@pytest.mark.parametrize("name", UNREADABLE_HEADERS)
def test_a_swap_header_safetensors_cannot_read_is_refused(base_fp32, tenant, name):
    payload = _rewritten_header(_payload(tenant, 2.0), UNREADABLE_HEADERS[name])
    with pytest.raises(Exception):
        safetensors.torch.load(payload)  # the reader a restart uses refuses it
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        replace_n(read_adapter(tenant, base_fp32), payload)


@pytest.mark.parametrize("name", READABLE_HEADERS)
def test_a_swap_header_safetensors_reads_is_taken(base_fp32, tenant, name):
    payload = _rewritten_header(_payload(tenant, 2.0), READABLE_HEADERS[name])
    want = safetensors.torch.load(payload)  # the reference: what a restart reads back
    fast = replace_n(read_adapter(tenant, base_fp32), payload)
    for (layer, module), site in fast.sites.items():
        key = next(k for k in want if f"layers.{layer}." in k and f".{module}." in k)
        assert torch.equal(site.N, want[key])


def test_a_refused_swap_header_leaves_the_tenant_served_across_a_restart(base_fp32, tenant, tmp_path):
    manager = AdapterManager(base_fp32, tmp_path / "store")
    v1 = manager.register_dir("acme", tenant)
    payload = _rewritten_header(_payload(tenant, 2.0), UNREADABLE_HEADERS["metadata int"])
    with pytest.raises(AdapterError, match="invalid type: integer `60`, expected a string"):
        manager.swap("acme", payload)
    assert manager.registry.get("acme") is v1 and manager.registry.store.versions("acme") == [1]
    restarted = AdapterManager(base_fp32, tmp_path / "store").registry.get("acme")
    assert (restarted.version, restarted.content_hash) == (1, v1.content_hash)


def test_pool_write_in_pieces_equals_float64_s_times_n(base_fp32):
    adapter = init_adapter(base_fp32, rank=16, targets="all-linear")  # 210 sites · 256 > one piece
    gen = torch.Generator().manual_seed(1)
    for i, site in enumerate(adapter.sites.values()):
        site.N = torch.randn(16, 16, generator=gen)
        site.scaling = 0.5 + i / 100
    residency = Residency(base_fp32, load=None, tied_budget=1 << 30, max_loras=1, max_rank=16)
    version = AdapterVersion("t", 1, adapter, Path())
    residency.admit(version)
    want = torch.stack([(s.scaling * s.N.to(torch.float64)).to(torch.float32) for s in adapter.sites.values()])
    assert torch.equal(version.pool.n[version.slot], want)


def test_overflowing_scaled_n_is_refused_and_its_slot_given_back(base_fp32):
    adapter = init_adapter(base_fp32, rank=4, targets=["q_proj"], layers=[0, 1])
    residency = Residency(base_fp32, load=None, tied_budget=1 << 30, max_loras=1, max_rank=16)
    residency.admit(AdapterVersion("ok", 1, adapter, Path()))
    pool = next(iter(residency.tied_pools.values()))
    last = list(adapter.sites.values())[-1]
    last.N, last.scaling = torch.full((4, 4), 3e38), 10.0
    with pytest.raises(AdapterError, match="overflows"):
        residency.admit(AdapterVersion("big", 1, adapter, Path()))
    assert pool.used == 1
