"""The engine's one handle on adapters: store + registry + residency, wired together.

Front ends call :meth:`AdapterManager.acquire` when they admit a request (NOT_FOUND at once for an
unknown name) and the engine calls :meth:`release` exactly once when the request ends; the native
engine splits it into :meth:`~AdapterManager.reserve` and :meth:`~AdapterManager.place`, so that a
request finding no free LoRA slot waits for one. A response
of several requests (OpenAI's ``n``, a batch of prompts) takes a :meth:`hold` on a version first and
queues each of its requests on it, so that a hot swap in between changes none of them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from nlora_serve.adapters.family import FamilyResolver, import_family
from nlora_serve.adapters.file_read import ALLOWED_FILES, CONFIG_FILE, WEIGHTS_FILE, check_folder
from nlora_serve.adapters.limits import AdapterLimits
from nlora_serve.adapters.loader import read_adapter, read_adapter_bytes
from nlora_serve.adapters.runtime.pool import Placement
from nlora_serve.adapters.runtime.registry import AdapterRegistry
from nlora_serve.adapters.runtime.version import AdapterVersion, Hold, restored_summary
from nlora_serve.adapters.runtime.residency import Residency
from nlora_serve.adapters.runtime.swap import replace_n
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.adapters.store.batch import OpenBatch
from nlora_serve.adapters.store.base_record import BaseIdentity, adopt_after_restore, check_base
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel

log = logging.getLogger(__name__)


class AdapterManager:
    """Adapters served on one base model, persisted under ``adapter_dir``.

    ``residency`` places versions where the engine reads them: by default our pools
    (:class:`Residency`); another engine passes its own object with the same ``admit`` /
    ``ensure_resident`` / ``free`` methods (the vLLM backend folds each version to a LoRA folder).

    Raises (constructor): ValueError for bad limits. AdapterError: the store is another base
    model's (store/base_record.py), or in use by another process. Registered adapters found in the
    store are loaded at construction (invalid ones are skipped with a warning, never served).
    """

    def __init__(self, base: BaseModel, adapter_dir: str | os.PathLike, limits: AdapterLimits | None = None,
                 residency=None, placement: Placement | None = None,
                 tenant_shares: Mapping[str, float] | None = None):
        self.base = base
        self.limits = limits or AdapterLimits()
        # compressed family members share one copy of their factors, found in the store's _families
        store = AdapterStore(adapter_dir, max_bytes=self.limits.max_adapter_bytes)
        check_base(store, BaseIdentity(base.fingerprint, str(base.path)))  # another model's store: refused
        self.families = FamilyResolver(base.spec, (store.root,), max_bytes=self.limits.max_adapter_bytes)
        load = self._load_stored
        self.residency = residency if residency is not None else Residency(
            base, load, tied_budget=self.limits.adapter_memory, max_loras=self.limits.max_loras,
            max_rank=self.limits.max_rank, placement=placement, tenant_shares=tenant_shares)
        # (id(version), tenant) -> that tenant's requests pinned on the version: what ListAdapters tells
        # a tenant, as an adapter granted to several tenants runs the others' requests too
        self._pins: Counter = Counter()
        self._pins_lock = threading.Lock()
        self._slot_listeners: list[Callable[[], None]] = []
        self.slot_changes = 0  # changes that may give a LoRA slot to a request refused one (on_slot_change)
        self.registry = AdapterRegistry(store, load, self._load_files, on_admit=self._admit, on_free=self._free,
                                        keep_versions=self.limits.keep_versions)
        restored = [self.registry.get(name) for name in self.registry.rebuild()]
        adopt_after_restore(store, len(restored))  # an older store none of whose adapters fits: not recorded
        if restored:  # named, as an operator asks `client list` what a restart serves
            log.info("%s", restored_summary(restored, adapter_dir))

    def _load(self, path: Path):
        return read_adapter(path, self.base, max_rank=self.limits.max_rank, families=self.families,
                            max_bytes=self.limits.max_adapter_bytes)

    def _load_stored(self, path: Path, content_hash: str | None = None):
        """A version folder of the store (a restore, a cold load), read through the store: no
        link is followed at any level, and its files are checked against the sha256 the store
        recorded (StoredHashMismatch refuses that version only). A version an older nlora-serve
        wrote, without them, has them recorded once it validated (AdapterStore.record_sums) and,
        for a cold load, hashes to ``content_hash``, the version's (else the cold load refuses it:
        recorded, a restart would serve the changed files as the store's)."""
        store, files = self.registry.store, self._stored_files(path)
        adapter = self._load_files(files, source=str(path))
        if content_hash is None or adapter.content_hash == content_hash:
            store.record_sums(path, files)
        return adapter

    def _stored_files(self, path: Path) -> dict[str, bytes]:
        """Both files of the store's version folder ``path``, read through the store (checked
        against its SHA256SUMS, no link followed).

        Raises:
            AdapterError: as AdapterStore.read_files, a file missing, or no such folder.
        """
        try:
            files = self.registry.store.read_files(path)
        except FileNotFoundError:
            raise AdapterError(f"{path}: no such adapter version folder") from None
        missing = [f for f in ALLOWED_FILES if f not in files]
        if missing:
            raise AdapterError(f"{path}: no {' and no '.join(missing)} (a store version holds both)")
        return files

    def _load_files(self, files: dict[str, bytes], source: str = "upload"):
        return read_adapter_bytes(files[CONFIG_FILE], files[WEIGHTS_FILE], self.base, max_rank=self.limits.max_rank,
                                  source=source, families=self.families)

    def acquire(self, name: str, tenant: str | None = None, held: Hold | None = None) -> AdapterVersion:
        """Pin ``name``'s current version for one request (of ``tenant``: its share of the LoRA
        slots, :class:`~nlora_serve.adapters.runtime.residency.Residency`) and make sure it is resident:
        :meth:`reserve`, then :meth:`place`. With ``held`` (the caller's :meth:`hold` on a version
        of ``name``): pin that version, current or superseded.

        Raises:
            AdapterNotFound, ValueError: see :meth:`reserve`. SlotBusy, PoolFull,
            AdapterLoadFailed: see :meth:`place` (nothing stays pinned).
        """
        version = self.reserve(name, tenant, held)
        try:
            self.place(version, tenant)
        except BaseException:
            self.unreserve(version, tenant)
            raise
        return version

    def reserve(self, name: str, tenant: str | None = None, held: Hold | None = None) -> AdapterVersion:
        """Pin ``name``'s current version (or ``held``'s, as :meth:`acquire`) for one request of
        ``tenant`` so that it is not freed, without a LoRA slot yet: :meth:`place` gives it one,
        :meth:`unreserve` drops a request that never got one.

        Raises:
            AdapterNotFound: unknown or unloaded name (with ``held``: unloaded since it was held).
            ValueError: ``held`` on a version of another name (the caller's bug: never a tenant's).
        """
        if held is None:
            version = self.registry.acquire(name)
        elif held.version.name != name:
            raise ValueError(f"adapter version {held.version.name} v{held.version.version} is not one of {name!r}")
        else:
            version = self.registry.acquire_held(held)
        with self._pins_lock:
            self._pins[id(version), tenant] += 1
        return version

    def place(self, version: AdapterVersion, tenant: str | None = None) -> None:
        """Make a version :meth:`reserve` pinned resident for its request (a cold load if evicted);
        from here on :meth:`release` ends the request.

        Raises:
            SlotBusy: an untied adapter found every LoRA slot held, or its tenant's share of them
                (one may free: the request stays reserved, to be placed again or unreserved).
            AdapterLoadFailed: an evicted untied adapter's files could not be read back.
        """
        if self.residency.ensure_resident(version, tenant):  # a slot newly held: other tenants' requests
            self._slot_changed()  # on its version take no further slot (the share rule lets them in)

    def unreserve(self, version: AdapterVersion, tenant: str | None = None) -> None:
        """Drop a :meth:`reserve` that :meth:`place` never placed (a refused or aborted request)."""
        self._count_down(version, tenant)
        self.registry.release(version)

    def release(self, version: AdapterVersion, tenant: str | None = None) -> None:
        """Unpin (exactly once per acquire, with its ``tenant``)."""
        self._count_down(version, tenant)
        slot_let_go = self.residency.unpin(version, tenant)
        self.registry.release(version)
        if slot_let_go:
            self._slot_changed()

    def on_slot_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the thread of the change, no lock held) after each change that may
        let a request refused a LoRA slot (:class:`~nlora_serve.adapters.runtime.residency.SlotBusy`) have
        one, with no request placed by a step: a tenant's last request on an untied version ended,
        a hold taken or let go, a version freed, a slot newly held (see :meth:`place`), the
        tenants' shares changed. Each is counted in :attr:`slot_changes` before the callbacks run.
        The native engine wakes its step thread with it (engine/slot_wait.py)."""
        self._slot_listeners.append(callback)

    def _slot_changed(self) -> None:
        with self._pins_lock:
            self.slot_changes += 1
        for callback in self._slot_listeners:
            callback()

    def _admit(self, version: AdapterVersion) -> None:
        """The registry admits ``version`` (residency's ``admit``); a family member holds its
        family's factors in :attr:`families` until :meth:`_free` (not when admit refuses it)."""
        self.families.hold(version.adapter)
        try:
            self.residency.admit(version)
        except BaseException:
            self.families.let_go(version.family)
            raise

    def _free(self, version: AdapterVersion) -> None:
        """The registry freed ``version``: its slot and memory go back (residency's ``free``), and
        its family's factors leave :attr:`families` with the family's last version."""
        try:
            self.residency.free(version)
        finally:
            self.families.let_go(version.family)
        self._slot_changed()

    def set_tenant_shares(self, weights: Mapping[str, float]) -> None:
        """New tenant weights for the LoRA slots' shares (a tenants-file reload; see
        :meth:`Residency.set_tenant_shares <nlora_serve.adapters.runtime.residency.Residency.set_tenant_shares>`)."""
        self.residency.set_tenant_shares(weights)
        self._slot_changed()

    def _count_down(self, version: AdapterVersion, tenant: str | None) -> None:
        with self._pins_lock:
            key = (id(version), tenant)
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def hold(self, name: str, requests: int) -> Hold:
        """Keep ``name``'s current version from being freed or evicted, for the ``requests``
        requests of one response to be queued on it (:meth:`acquire` with ``held``), until
        :meth:`let_go`. A hold is no request: ``refcount``, :meth:`holders` and :meth:`requests_of`
        do not count it; :meth:`draining` counts its requests not queued yet.

        Raises:
            AdapterNotFound: unknown or unloaded name.
        """
        held = self.registry.hold(name, requests)
        self._slot_changed()  # its requests to come take no further slot (residency's share rule)
        return held

    def let_go(self, held: Hold) -> None:
        """End a :meth:`hold` (a superseded version nobody runs on is freed now)."""
        self.registry.let_go(held)
        self._slot_changed()  # its slot may be evicted now

    def requests_of(self, version: AdapterVersion, tenant: str | None) -> int:
        """``tenant``'s requests running or queued on ``version`` now (``version.refcount`` counts
        every tenant's)."""
        with self._pins_lock:
            return self._pins.get((id(version), tenant), 0)

    def start_names(self, names: list[str]) -> list[str]:
        """Of the adapters a start flag names, those to register now: not served yet and not
        unloaded by an operator (the store remembers an unload across restarts; a start flag does
        not undo it: ``client load NAME`` does). Logs each name it leaves unloaded.
        """
        present = {v.name for v in self.versions()}
        fresh = []
        for name in names:
            if name in present:
                continue
            if self.registry.store.is_unloaded(name):
                log.warning("adapter %r was unloaded by an operator: not serving it again from a start flag "
                            "(load it back with `nlora-serve client load --name %s`)", name, name)
                continue
            fresh.append(name)
        return fresh

    def start_batch(self) -> OpenBatch:
        """The registrations of a start, undone together should it fail, open from now: versions
        written until its ``abort()`` are taken back out of the store and the removals they caused
        never happen (store/batch.py); at its ``commit()`` the removals happen and the store records
        its base model (store/base_record.py). As a context manager, committed when the block ends,
        aborted when it raises. For a start only: after an abort the registry still lists what was
        undone."""
        return OpenBatch(self.registry.store)

    def check_dir(self, adapter_dir: str | os.PathLike) -> None:
        """Read and validate the adapter in ``adapter_dir`` against the base model (shapes, layers,
        targets, rank, dtype, a tied tenant's base), as :meth:`register_dir` would, writing nothing.

        Raises:
            AdapterError: it is not a servable adapter for this base model (the message names why).
        """
        check_folder(Path(adapter_dir), self.limits.max_adapter_bytes)
        self._load(Path(adapter_dir))

    def served_instead(self, name: str, adapter_dir: str | os.PathLike) -> AdapterVersion | None:
        """The version served under ``name`` when its maths differ from the adapter in
        ``adapter_dir`` (content hashes compared: a swap or upload since that folder was
        registered); None when ``name`` is not served or serves that same adapter.

        Raises:
            AdapterError: ``adapter_dir`` is not a servable adapter.
        """
        current = {v.name: v for v in self.versions()}.get(name)
        if current is not None:
            check_folder(Path(adapter_dir), self.limits.max_adapter_bytes)  # a FIFO config blocked the start
        if current is None or self._load(Path(adapter_dir)).content_hash == current.content_hash:
            return None
        return current

    def register_dir(self, name: str, adapter_dir: str | os.PathLike, if_version: int | None = None) -> AdapterVersion:
        """Register the adapter in a local directory as the next version of ``name``.

        Args:
            if_version: as :meth:`AdapterRegistry.register` (0: only while ``name`` is not served).

        Raises:
            AdapterError: the directory is not a servable adapter (an adapter file that is a FIFO,
                a device or a folder is refused before anything reads it), or ``name`` is invalid.
            VersionConflict: ``if_version`` is not the current version.
        """
        adapter_dir, store = Path(adapter_dir), self.registry.store
        check_folder(adapter_dir, self.limits.max_adapter_bytes)
        if adapter_dir.resolve().is_relative_to(store.root):  # a stored version (an HTTP load of its folder):
            return self.registry.register(name, self._stored_files(adapter_dir.resolve()), if_version)  # checked
        import_family(name, adapter_dir, self.families, self.registry.store)  # a compact family member
        try:
            files = {f: _read_at_most(adapter_dir / f, self.limits.max_adapter_bytes)
                     for f in ALLOWED_FILES if (adapter_dir / f).is_file()}
        except OSError as exc:  # EACCES, EIO: the folder's fault, not the server's
            raise AdapterError(f"{adapter_dir}: cannot read its adapter files ({exc.strerror or exc})") from None
        if sum(map(len, files.values())) > self.limits.max_adapter_bytes:  # grown since the check
            raise AdapterError(f"{adapter_dir}: its adapter files grew past the server's --max-adapter-bytes "
                               f"{self.limits.max_adapter_bytes} while being read")
        if len(files) < len(ALLOWED_FILES):
            read_adapter(adapter_dir, self.base, max_rank=self.limits.max_rank,  # names what is wrong
                         max_bytes=self.limits.max_adapter_bytes)
            raise AdapterError(f"{adapter_dir}: expected {' and '.join(ALLOWED_FILES)}")
        return self.registry.register(name, files, if_version)

    def register(self, name: str, files: dict[str, bytes], if_version: int | None = None) -> AdapterVersion:
        """Register uploaded files (see :meth:`AdapterRegistry.register`)."""
        return self.registry.register(name, files, if_version)

    def swap(self, name: str, weights: bytes, if_version: int | None = None) -> AdapterVersion:
        """Hot-swap ``name``'s weights: a tied tenant's (or a family member's) N-only safetensors
        ``weights``, checked by :func:`~nlora_serve.adapters.runtime.swap.replace_n`, written durably and
        switched to (see :meth:`AdapterRegistry.swap_weights`). ``if_version``: swap only if it is
        the current version. Returns the new version; running requests finish on their own.

        Raises:
            AdapterNotFound: ``name`` is not registered. AdapterError: the payload does not fit the
                tenant (keys, shapes, dtype, non-finite values) or the tenant is untied.
            VersionConflict: ``if_version`` is not the current version. PoolFull: the new N would
                exceed ``--adapter-memory``.
        """
        return self.registry.swap_weights(name, weights, if_version, validate=replace_n)

    def unload(self, name: str, force: bool = False) -> AdapterVersion:
        """Stop serving ``name``: in-flight requests finish on their version, and so do those a
        response holding it has still to queue; with ``force`` (the engine aborts the in-flight
        ones) those are refused (:meth:`AdapterRegistry.unload`)."""
        return self.registry.unload(name, force)

    def holders(self, name: str) -> int:
        """Requests running on any version of ``name`` (see :meth:`AdapterRegistry.holders`)."""
        return self.registry.holders(name)

    def draining(self, name: str) -> int:
        """Requests an unload of ``name`` without force lets run: those running on any version of
        it and those the responses holding one have still to queue (:meth:`hold`)."""
        return self.registry.holders(name) + self.registry.to_come(name)

    def versions(self) -> list[AdapterVersion]:
        """Current versions, by name."""
        return self.registry.versions()


def _read_at_most(path: Path, limit: int) -> bytes:
    """The first ``limit`` + 1 bytes of ``path`` at most: a file grown since it was sized is not
    read whole."""
    with open(path, "rb") as f:
        return f.read(limit + 1)
