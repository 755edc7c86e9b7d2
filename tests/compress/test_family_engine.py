"""A compressed family served by the engine: store format, registry, residency, hot-swap, and the
adapter hook's output against the family maths in float64 (read from the files directly)."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import safetensors.torch
import torch

from family_helpers import family_deltas, lora_deltas, write_lora
from family_helpers import key as key_of
from nlora_serve.adapters.compress.build import compress_adapters, write_family
from nlora_serve.adapters.runtime.family_pool import FamilyPool
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.engine.model.adapter_layer import AdapterHook
from nlora_serve.errors import AdapterError

RANK = 8
NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def family_dir(base_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    loras = {n: write_lora(root / "loras" / n, base_fp32.spec, seed=i, alpha=4.0 + 4 * i) for i, n in enumerate(NAMES)}
    adapters = {n: read_adapter(d, base_fp32) for n, d in loras.items()}
    family = compress_adapters(adapters, RANK)
    write_family(root / "out", family)
    return root


def _manager(base, store):
    return AdapterManager(base, store)


def _hook_delta(hook, versions, lens, layer, modules, base, gen):
    widths = [base.spec.projection_shape(m)[0] for m in modules]
    x = torch.randn(sum(lens), base.spec.projection_shape(modules[0])[1], generator=gen)
    y = torch.zeros(sum(lens), sum(widths))
    hook.begin_step(versions, lens, torch.device("cpu"))
    hook(x, y, layer, modules, widths)
    hook.end_step()
    return x, y, widths


def _reference(x, versions, lens, layer, modules, deltas, widths):
    ref = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    row = 0
    for v, n in zip(versions, lens):
        if v is not None:
            col = 0
            for m, w in zip(modules, widths):
                d = deltas[v.name].get((layer, m))
                if d is not None:
                    ref[row:row + n, col:col + w] = x[row:row + n].double() @ d.T
                col += w
        row += n
    return ref


@pytest.mark.parametrize("native", [False, True])
def test_hook_output_equals_family_math(base_fp32, family_dir, tmp_path, native, request):
    manager = _manager(base_fp32, tmp_path / "store")
    versions = {n: manager.register_dir(n, family_dir / "out" / n) for n in NAMES}
    pools = {id(v.pool) for v in versions.values()}
    assert len(pools) == 1 and isinstance(versions["alpha"].pool, FamilyPool)
    sites = base_fp32.spec.num_layers * 3
    assert all(v.held_bytes == sites * RANK * RANK * 4 and v.swaps_n for v in versions.values())
    deltas = {n: family_deltas(family_dir / "out", n) for n in NAMES}
    hook = AdapterHook(native=request.getfixturevalue("native_ops") if native else None)
    gen = torch.Generator().manual_seed(0)
    order = [versions["alpha"], None, versions["gamma"], versions["beta"], versions["alpha"]]
    lens = [3, 2, 5, 1, 4]
    for layer, modules in ((0, ("q_proj", "k_proj", "v_proj")), (7, ("down_proj",)), (29, ("gate_proj", "up_proj"))):
        x, y, widths = _hook_delta(hook, order, lens, layer, modules, base_fp32, gen)
        ref = _reference(x, order, lens, layer, modules, deltas, widths)
        assert float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)) < 1e-5 or ref.norm() == 0
        if layer == 7:
            assert ref.norm() > 0


def test_store_restart_swap_and_refusals(base_fp32, family_dir, tmp_path):
    store = tmp_path / "store"
    manager = _manager(base_fp32, store)
    for n in NAMES:
        manager.register_dir(n, family_dir / "out" / n)
    key = manager.registry.get("alpha").family
    assert (store / "_families" / key / "family.safetensors").is_file()
    stored = safetensors.torch.load_file(manager.registry.get("beta").path / "adapter_model.safetensors")
    assert all(k.endswith("lora_N.weight") for k in stored)

    again = _manager(base_fp32, store)  # a restart rebuilds every member from the store
    assert {v.name for v in again.versions()} == set(NAMES)
    assert again.registry.get("beta").content_hash == manager.registry.get("beta").content_hash
    assert "_families" not in again.registry.store.names()

    # hot-swap a member's N: the new version serves the new N, the family is unchanged
    new_n = {k: 2 * v for k, v in stored.items()}
    swapped = again.swap("beta", safetensors.torch.save(new_n))
    assert swapped.version == 2 and swapped.pool is again.registry.get("alpha").pool
    for (layer, module), site in swapped.adapter.sites.items():
        assert torch.equal(site.N, new_n[key_of(layer, module, "lora_N.weight")])

    lone = tmp_path / "lone"
    shutil.copytree(family_dir / "out" / "gamma", lone / "gamma")
    with pytest.raises(AdapterError, match="shared factors .* are missing"):
        read_adapter(lone / "gamma", base_fp32)
    forged = tmp_path / "forged"
    shutil.copytree(family_dir / "out", forged)
    fam = forged / "_families" / key / "family.safetensors"
    t = safetensors.torch.load_file(fam)
    first = next(iter(t))
    t[first] = t[first] + 1e-3
    safetensors.torch.save_file(t, str(fam), metadata={"format": "pt", "base_fingerprint": base_fp32.fingerprint})
    with pytest.raises(AdapterError, match="hash to"):
        read_adapter(forged / "gamma", base_fp32)


def test_full_form_upload_writes_the_factors_once(base_fp32, family_dir, tmp_path):
    from nlora_serve.adapters.save import tensor_dict

    member = read_adapter(family_dir / "out" / "alpha", base_fp32)
    config = (family_dir / "out" / "alpha" / "adapter_config.json").read_bytes()
    weights = safetensors.torch.save({k: v.to(torch.float32) for k, v in tensor_dict(member).items()})
    manager = _manager(base_fp32, tmp_path / "store")
    version = manager.register("up", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    assert version.family == member.shared_family and version.content_hash == member.content_hash
    assert (tmp_path / "store" / "_families" / member.shared_family / "family.safetensors").is_file()
    on_disk = safetensors.torch.load_file(version.path / "adapter_model.safetensors")
    assert all(k.endswith("lora_N.weight") for k in on_disk)


def _full_form_upload(base, family_dir):
    """(config, weights) bytes of member alpha in the full form (lora_A = A_f, lora_N, lora_B = B_f)."""
    from nlora_serve.adapters.save import tensor_dict

    member = read_adapter(family_dir / "out" / "alpha", base)
    weights = safetensors.torch.save({k: v.to(torch.float32) for k, v in tensor_dict(member).items()})
    return (family_dir / "out" / "alpha" / "adapter_config.json").read_bytes(), weights, member.shared_family


def test_a_full_form_uploads_factors_are_durable_before_its_version(base_fp32, family_dir, tmp_path):
    """The factors were written with plain os calls and no folder fsync: after a power loss the
    acknowledged member's version could be on disk without them (not servable at the restart)."""
    from nlora_serve.adapters.store import durable

    config, weights, key = _full_form_upload(base_fp32, family_dir)
    manager = _manager(base_fp32, tmp_path / "store")
    root, ops = manager.registry.store.root, []
    previous = durable.set_fault_hook(ops.append)
    try:
        version = manager.register("up", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    finally:
        durable.set_fault_hook(previous)
    factors, families = root / "_families" / key, root / "_families"
    at = {}  # each operation's first index
    for i, op in enumerate(ops):
        at.setdefault((op.kind, op.path, op.target), i)
    staged = next(op.path for op in ops if op.kind == "rename" and op.target == factors)
    member_rename = next(i for i, op in enumerate(ops) if op.kind == "rename" and op.target == version.path)
    assert (at[("fsync_file", staged / "family.safetensors", None)] < at[("fsync_dir", staged, None)]
            < at[("rename", staged, factors)] < at[("fsync_dir", families, None)] < member_rename)
    assert at[("mkdir", families, None)] < at[("fsync_dir", root, None)] < at[("rename", staged, factors)]
    on_disk = safetensors.torch.load_file(factors / "family.safetensors")
    assert len(on_disk) == 2 * len(version.adapter.sites)


def test_a_disk_error_writing_a_familys_factors_changes_nothing(base_fp32, family_dir, tmp_path):
    """A full disk at the factors was a bare OSError (gRPC UNKNOWN), not the store's own refusal."""
    from nlora_serve.adapters.store import durable
    from nlora_serve.adapters.store.durable import StoreWriteError

    config, weights, key = _full_form_upload(base_fp32, family_dir)
    manager = _manager(base_fp32, tmp_path / "store")
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}

    def disk_full(op):
        if op.kind == "write" and op.path.name == "family.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    previous = durable.set_fault_hook(disk_full)
    try:
        with pytest.raises(StoreWriteError, match=r"adapter 'up': the adapter store's disk refused the write "
                                                  r"\(ENOSPC: No space left on device\)"):
            manager.register("up", files)
    finally:
        durable.set_fault_hook(previous)
    root = manager.registry.store.root
    assert sorted(p.name for p in root.iterdir()) == [".staging"] and list((root / ".staging").iterdir()) == []
    assert [v.name for v in manager.versions()] == []
    assert manager.register("up", files).family == key  # the disk has room again


def test_compressed_family_error_is_measured_against_the_loras(base_fp32, family_dir):
    # three r=4 LoRAs span 12 directions: R=8 loses some; the report's error is the dense one
    adapters = {n: read_adapter(family_dir / "loras" / n, base_fp32) for n in NAMES}
    family = compress_adapters({n: adapters[n] for n in NAMES}, RANK, iters=1)
    site, dense_all = (5, "v_proj"), []
    for n in NAMES:
        d = lora_deltas(family_dir / "loras" / n)[site]
        a_f, b_f = family.factors.sites[site]
        got = b_f.double() @ family.members[n][site].double() @ a_f.double()
        dense = float((d - got).norm() / d.norm())
        assert family.errors[n][site] == pytest.approx(dense, rel=1e-4)
        dense_all.append(dense)
    assert 0.05 < max(dense_all) < 1  # lossy at R=8, never worse than dropping the adapter
    exact = compress_adapters(adapters, 12, iters=0)
    assert max(max(e.values()) for e in exact.errors.values()) < 1e-4


def test_a_refused_full_form_upload_leaves_its_factors_uncached(base_fp32, family_dir, tmp_path):
    """The reader cached a full-form member's own factors before the magnitude bounds ran: each
    refused upload of another family kept its factors (~31 MB at rank 16 on every projection)
    for the server's life (10 such uploads: +310 MB resident, 10 families cached)."""
    config, weights, key = _full_form_upload(base_fp32, family_dir)
    tensors = safetensors.torch.load(weights)
    huge = safetensors.torch.save({k: v * 1e30 if "lora_N" in k else v for k, v in tensors.items()})
    manager = _manager(base_fp32, tmp_path / "store")
    with pytest.raises(AdapterError, match="lora_N.weight' at model.layers.0.self_attn.q_proj: the layer's output"):
        manager.register("up", {"adapter_config.json": config, "adapter_model.safetensors": huge})
    assert key not in manager.families._cache
    version = manager.register("up", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    assert version.family == key and key in manager.families._cache  # an accepted member's factors are shared


def test_a_familys_factors_leave_the_cache_with_its_last_member(base_fp32, family_dir, tmp_path):
    """The factors cache kept a family after every member was unloaded or replaced (for the
    server's life: up to 78 MB per family at rank 64)."""
    manager = _manager(base_fp32, tmp_path / "store")
    for n in NAMES:
        manager.register_dir(n, family_dir / "out" / n)
    key = manager.registry.get("alpha").family
    assert manager.families.cached() == {key}
    shared = manager.registry.get("alpha").adapter.sites
    assert all(shared[s].A is w.A for s, w in manager.registry.get("gamma").adapter.sites.items())  # one copy
    manager.register_dir("alpha", family_dir / "loras" / "alpha")  # replaced by a plain LoRA
    manager.unload("beta")
    stored = safetensors.torch.load_file(manager.registry.get("gamma").path / "adapter_model.safetensors")
    manager.swap("gamma", safetensors.torch.save({k: 2 * v for k, v in stored.items()}))  # v1 freed, v2 holds
    assert manager.families.cached() == {key}
    manager.unload("gamma")
    assert manager.families.cached() == set()
    manager.register_dir("beta", family_dir / "out" / "beta")  # read again from the store
    assert manager.families.cached() == {key}


def test_a_member_the_registry_refuses_leaves_its_factors_uncached(base_fp32, family_dir, tmp_path):
    """A member the reader accepted and the registry then refused (a disk error writing its
    factors, --adapter-memory full) kept its family's factors cached."""
    from nlora_serve.adapters.store import durable
    from nlora_serve.adapters.store.durable import StoreWriteError
    from nlora_serve.adapters.limits import AdapterLimits
    from nlora_serve.adapters.runtime.residency import PoolFull

    config, weights, key = _full_form_upload(base_fp32, family_dir)
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    manager = _manager(base_fp32, tmp_path / "store")

    def disk_full(op):
        if op.kind == "write" and op.path.name == "family.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    previous = durable.set_fault_hook(disk_full)
    try:
        with pytest.raises(StoreWriteError):
            manager.register("up", files)
    finally:
        durable.set_fault_hook(previous)
    assert manager.families.cached() == set()
    full = AdapterManager(base_fp32, tmp_path / "full", AdapterLimits(adapter_memory=1))
    with pytest.raises(PoolFull, match="--adapter-memory"):
        full.register_dir("alpha", family_dir / "out" / "alpha")
    with pytest.raises(PoolFull, match="--adapter-memory"):
        full.register("up", files)
    assert full.families.cached() == set()


def test_a_full_form_upload_on_a_bfloat16_server_is_served_again_after_a_restart(base_fp32, base_model_dir,
                                                                                family_dir, tmp_path):
    """The factors were rebuilt from the member's bfloat16-cast A and B: written under another key
    than its config names, so a restart refused the member (its factors "missing")."""
    from nlora_serve.models import load_base

    base = load_base(str(base_model_dir), torch.bfloat16)
    config, weights, key = _full_form_upload(base_fp32, family_dir)  # float32 factors, as compress writes
    version = _manager(base, tmp_path / "store").register(
        "up", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    assert [p.name for p in (tmp_path / "store" / "_families").iterdir()] == [key]
    again = _manager(base, tmp_path / "store")
    assert [(v.name, v.content_hash) for v in again.versions()] == [("up", version.content_hash)]


def test_members_read_at_once_share_one_copy_of_their_factors_once_admitted(base_fp32, family_dir, tmp_path):
    """No member is cached before it is admitted, so two uploads of a new family read at once each
    hold a copy: the second admitted is re-pointed to the first's (the family held once)."""
    config, weights, key = _full_form_upload(base_fp32, family_dir)
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    manager = _manager(base_fp32, tmp_path / "store")
    first, second = manager._load_files(files), manager._load_files(files)
    assert first.family_factors is not second.family_factors and manager.families.cached() == set()
    manager.registry.register("one", files, adapter=first)
    manager.registry.register("two", files, adapter=second)
    assert second.family_factors is first.family_factors and manager.families.cached() == {key}
    assert all(second.sites[s].A is w.A and second.sites[s].B is w.B for s, w in first.sites.items())


def test_a_familys_pool_is_freed_with_its_last_member_and_a_new_one_serves_right(base_fp32, family_dir, tmp_path):
    """Residency kept a family's FamilyPool (its own copy of the factors: up to 78 MB at rank 64,
    and N for 64 members) for the server's life after every member was unloaded, and the hook's
    views (keyed by the pool's id) kept its tensors too: memory grew by that much per family
    loaded and unloaded. A pool made after (at the dead one's address, perhaps) must not be read
    through the dead one's cached views: its output is checked against the family maths."""
    import gc
    import weakref

    manager = _manager(base_fp32, tmp_path / "store")
    versions = [manager.register_dir(n, family_dir / "out" / n) for n in NAMES]
    hook, gen, modules = AdapterHook(), torch.Generator().manual_seed(0), ("q_proj", "k_proj", "v_proj")
    _hook_delta(hook, versions, [2, 1, 3], 0, modules, base_fp32, gen)
    pool = versions[0].pool
    dead_generation = pool.generation
    gone = [weakref.ref(pool), weakref.ref(pool.n), *(weakref.ref(t) for ab in pool.factors.values() for t in ab)]
    del pool, versions
    for n in NAMES:
        manager.unload(n)
    gc.collect()
    assert [ref() for ref in gone] == [None] * len(gone) and manager.residency.pools() == [manager.residency.lora_pool]
    again = manager.register_dir("beta", family_dir / "out" / "beta")
    assert again.pool.generation != dead_generation  # (id, generation) keys never name the dead pool
    x, y, widths = _hook_delta(hook, [again], [3], 0, modules, base_fp32, gen)
    ref = _reference(x, [again], [3], 0, modules, {"beta": family_deltas(family_dir / "out", "beta")}, widths)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
