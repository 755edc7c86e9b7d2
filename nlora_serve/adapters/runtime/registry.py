"""The adapter registry: name -> current version, with exact reference counts (DESIGN §3).

- register: validate the files (load them into an :class:`Adapter`), persist them durably as the
  next version in the store, then switch the name to it atomically. Requests admitted after the
  switch get the new version; requests holding the old one keep it until they end.
- acquire / release: a request pins the version current at its admission and releases it exactly
  once on every terminal path (finish, abort, error, client gone).
- unload: new acquires get NOT_FOUND at once; the version is freed when its last holder releases.
  A forced unload also refuses the requests a hold has still to queue (the engine aborts those on
  the name); without force they run, as the requests already running do.
- hold / let_go: a request made of several engine requests (OpenAI's ``n``, a batch of prompts)
  keeps the version it runs on from being freed while it queues them one by one, each pinned with
  ``acquire_held``: a hot swap in between leaves all of them on the held version. Its requests not
  queued yet count as draining for an unload (``to_come``).

A version is *freed* (its ``on_free`` callback runs: the residency layer gives back its slot and
memory) when it is no longer current and no request or hold keeps it. The registry is
thread-safe: the front end registers and acquires from its threads while the engine thread releases.
This module owns the versions (register, swap, unload, free); registry_pins.py the requests' pins
on them (acquire / release, hold / let_go, and the counts an unload drains).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.family import compact_family_files
from nlora_serve.adapters.file_read import CONFIG_FILE, WEIGHTS_FILE
from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.runtime.registry_pins import RegistryPins
from nlora_serve.adapters.save import compact_tied_files
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.adapters.store.settings import resolve_keep_versions
from nlora_serve.adapters.runtime.swap import full_form_swap, stored_file
from nlora_serve.adapters.runtime.version import AdapterNotFound, AdapterVersion, VersionConflict
from nlora_serve.errors import AdapterError, shown

log = logging.getLogger(__name__)


class AdapterRegistry(RegistryPins):
    """Registered adapters by name, backed by an :class:`AdapterStore`.

    Args:
        store: the on-disk store (``--adapter-dir``).
        load: reads and validates an adapter directory against the served base model; raises
            :class:`AdapterError` naming what is wrong.
        load_files: the same for an adapter in memory (file name -> bytes): uploads and swaps are
            validated before anything touches the disk.
        on_admit: places a validated version (e.g. into a pool slot) before it is persisted and
            switched to; raising :class:`AdapterError` refuses the registration.
        on_free: called once per version, outside the lock, when it is neither current nor held.
        keep_versions: the newest versions of each name kept on disk (``--keep-versions``, the
            current one included): 1 deletes every older one once no request holds it; more keeps
            that many to roll back to (``adapters versions`` / ``adapters rollback``). None (no
            flag): what the store records (store/settings.py; 1 where none); a number is recorded.

    Raises (constructor): AdapterError: the store's settings record is unreadable. OSError: the
        disk refused a new record.
    """

    def __init__(self, store: AdapterStore, load: Callable[[Path], Adapter],
                 load_files: Callable[[dict[str, bytes]], Adapter],
                 on_admit: Callable[[AdapterVersion], None] = lambda v: None,
                 on_free: Callable[[AdapterVersion], None] = lambda v: None, keep_versions: int | None = None):
        self.store = store
        # newest versions of a name kept on disk, the current one included: the flag's, else the store's record
        self.keep_versions = resolve_keep_versions(store, keep_versions)
        self._load = load
        self._load_files = load_files
        self._on_admit = on_admit
        self._on_free = on_free
        self._current: dict[str, AdapterVersion] = {}
        self._retired: dict[str, list[AdapterVersion]] = {}  # superseded or unloaded, still held
        self._loading: set[str] = set()  # names not served whose first (or reloaded) version is being written
        self._lock = threading.Lock()  # guards _current, _retired and every refcount
        self._write_lock = threading.Lock()  # serialises register/swap (validation runs outside)

    def rebuild(self) -> list[str]:
        """Register the newest version of every adapter in the store (after a restart).

        An adapter that no longer validates is skipped with a warning, never served.
        Returns the names registered.
        """
        names, pruned, count = [], [], 0
        for name in self.store.names():
            stored = self.store.latest(name)
            try:
                version = AdapterVersion(name, stored.version, self._load(stored.path), stored.path)
                self._on_admit(version)
            except AdapterError as exc:
                log.warning("store adapter %s v%d not served: %s", name, stored.version, exc)
                continue
            self._switch(version)
            if removed := self._prune(name):
                pruned.append(f"{name} " + ", ".join(f"v{v}" for v in removed))
                count += len(removed)
            names.append(name)
        if pruned:  # a restart with a smaller --keep-versions than the store recorded, or after a kill
            log.warning("--keep-versions %d: deleting %d older version%s found in the adapter store: %s (kept by "
                        "a larger --keep-versions, or held by a request when the server last stopped; the store "
                        "keeps the --keep-versions N a start last gave)", self.keep_versions, count,
                        "s" if count != 1 else "", "; ".join(pruned))
        return names

    def register(self, name: str, files: dict[str, bytes], if_version: int | None = None,
                 adapter: Adapter | None = None) -> AdapterVersion:
        """Validate ``files``, persist them as the next version of ``name`` and make it current
        (the current version's maths again: that version is returned, nothing written).

        Args:
            files: ``adapter_config.json`` and ``adapter_model.safetensors`` bytes.
            if_version: when set, succeed only if ``name``'s current version is this one (0: only
                while ``name`` is not served, a new name's first version or one unloaded).
            adapter: ``files`` already validated into this adapter.

        Raises:
            AdapterError: invalid name or adapter (nothing is written, the old version serves on).
            VersionConflict: ``if_version`` is not the current version.
            StoreWriteError: the store's disk refused the write (nothing changed, the old version serves on).
        """
        validate_name(name)
        adapter = adapter if adapter is not None else self._validate(files)
        files = (compact_tied_files(adapter, files[WEIGHTS_FILE])  # DESIGN §3: N only on disk
                 or compact_family_files(name, adapter, files[WEIGHTS_FILE], self.store) or files)
        with self._write_lock:  # check, persist and switch as one step per registry
            self._check_version(name, if_version)
            version = self._commit(name, adapter, files)
        self._prune(name)  # a registration may follow an unload, whose newest folder stayed
        return version

    def swap_weights(self, name: str, weights: bytes, if_version: int | None = None,
                     validate: Callable[[Adapter, bytes], Adapter] | None = None) -> AdapterVersion:
        """Hot-swap: a new version of ``name`` with the current config and new safetensors bytes
        (for a tied tenant, a file of only ``lora_N`` keys).

        With ``validate``, the new version shares the current one's config file on disk (a hard
        link: only the weights are written) and ``weights`` are checked against the current
        adapter outside the write lock; should another registration of ``name`` switch first, the
        check is redone against that one (an ``if_version`` then fails as a conflict). A tied
        version stored in the full form gets that form's weights file with the new N (or is
        compacted, where it has no lora_B bias), so the new version on disk is whole.

        Args:
            validate: checks ``weights`` against the current adapter and returns the new one
                (default: the full validation of :meth:`register`).

        Raises:
            AdapterNotFound: ``name`` is not registered.
            AdapterError / VersionConflict: as :meth:`register`.
        """
        while True:
            current = self.get(name)
            if validate is None or current.adapter is None:  # the full path: re-read the config
                files = {CONFIG_FILE: stored_file(self.store, current, CONFIG_FILE), WEIGHTS_FILE: weights}
                return self.register(name, files, if_version)
            self._check_version(name, if_version)  # fail fast, before validating
            adapter = validate(current.adapter, weights)
            files = compact_tied_files(adapter, weights)  # a full-form tied version without a bias
            same_as = {} if files else {CONFIG_FILE: current.path / CONFIG_FILE}
            if files is None and adapter.is_tied and adapter.config.tied is None:  # kept full by a bias
                try:
                    files, adapter = full_form_swap(self.store, self._load_files, current, weights)
                except FileNotFoundError:  # superseded and removed meanwhile: redo against the new one
                    continue
            with self._write_lock:
                with self._lock:
                    unchanged = self._current.get(name) is current
                if unchanged:
                    self._check_version(name, if_version)
                    return self._commit(name, adapter, files or {WEIGHTS_FILE: weights}, same_as)

    def get(self, name: str) -> AdapterVersion:
        """The current version of ``name`` (no reference taken).

        Raises:
            AdapterNotFound: ``name`` is not registered.
        """
        with self._lock:
            found = self._current.get(name)
        if found is None:
            raise AdapterNotFound(self._missing(name))
        return found

    def _missing(self, name: str) -> str:
        """Why ``name`` has no current version: an operator is loading it now (the store's unload
        record is gone before the new version is switched to), unloaded it (its files are in the
        store and an admin's LoadAdapter serves it again), or it was never registered."""
        with self._lock:
            loading = name in self._loading
        if loading:
            return f"adapter {shown(name)!r} is being loaded by an operator and is not served yet; retry shortly"
        try:
            unloaded = self.store.is_unloaded(name)
        except (AdapterError, OSError):  # a name no adapter can have (the callers refuse those anyway)
            unloaded = False
        if unloaded:
            return (f"adapter {shown(name)!r} was unloaded by an operator (its files are kept: an admin's "
                    f"`nlora-serve adapters load --name {shown(name)}` serves it again)")
        return f"adapter {shown(name)!r} is not registered"

    def versions(self) -> list[AdapterVersion]:
        """Current versions, by name."""
        with self._lock:
            return [self._current[n] for n in sorted(self._current)]

    def _validate(self, files: dict[str, bytes]) -> Adapter:
        unknown = sorted(set(files) - {CONFIG_FILE, WEIGHTS_FILE})
        if unknown:
            raise AdapterError(f"files {unknown} are not part of an adapter; expected {CONFIG_FILE} "
                               f"and {WEIGHTS_FILE}")
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
        if missing:
            raise AdapterError(f"an adapter needs {' and '.join(missing)}")
        return self._load_files(files)

    def _check_version(self, name: str, if_version: int | None) -> None:
        if if_version is None:
            return
        with self._lock:
            current = self._current.get(name)
        if if_version == 0 and current is None:  # 0, no version: only while the name is not served
            return
        if current is None or current.version != if_version:
            have = current.version if current else "none"
            raise VersionConflict(f"adapter {name!r}: expected current version {if_version}, have {have}")

    def _commit(self, name: str, adapter: Adapter, files: dict[str, bytes],
                same_as: dict[str, Path] | None = None) -> AdapterVersion:
        """Under the write lock: admit ``adapter``, persist it durably, then switch ``name`` to it.
        The same maths as the current version (content hash and flavour) is that version: nothing is
        written, so a re-upload or a swap to what serves takes no ``--keep-versions`` place from a
        real rollback target (as vLLM's and LoRAX's loads of an adapter already loaded)."""
        version = AdapterVersion(name, 0, adapter, Path())
        with self._lock:
            current = self._current.get(name)
        if current is not None and (current.content_hash, current.flavour) == (version.content_hash, version.flavour) \
                and current.path.is_dir():  # not a version an aborted start took back out (batch.py)
            log.info("adapter %s: the new content is v%d's (content hash %s…): v%d serves on, no version written",
                     shown(name), current.version, current.content_hash[:16], current.version)
            return current
        self._on_admit(version)
        with self._lock:
            if name not in self._current:
                self._loading.add(name)
        try:
            try:
                stored = self.store.write(name, files, same_as)
            except BaseException:
                self._on_free(version)
                raise
            version.version, version.path = stored.version, stored.path
            return self._switch(version)
        finally:
            with self._lock:
                self._loading.discard(name)

    def _prune(self, name: str) -> list[int]:
        """Delete the folders of ``name``'s versions older than the current one that no live
        version uses and that are not among the newest ``keep_versions`` on disk: an unloaded version
        loaded back, what a restart or crash left behind, the oldest of those kept to roll back to.
        Not on the swap path: a swap supersedes a current version, which :meth:`_free` deletes
        when let go (or keeps, with ``keep_versions`` > 1, pruning the oldest then). Safe outside
        the write lock (a version older than current never revives; a write only adds a newer one).
        Returns the versions deleted, oldest first."""
        with self._lock:
            current = self._current.get(name)
            live = {v.version for v in self._retired.get(name, [])}
        if current is None:
            return []
        older = [v for v in self.store.versions(name) if v < current.version]
        kept = set(older[len(older) - (self.keep_versions - 1):]) if self.keep_versions > 1 else set()
        removed = [old for old in older if old not in live and old not in kept]
        for old in removed:
            self.store.remove_version(name, old)
        return removed

    def _switch(self, new: AdapterVersion) -> AdapterVersion:
        with self._lock:
            old = self._current.get(new.name)
            self._current[new.name] = new
            free = False
            if old is not None:
                old.current = False
                free = self._take_if_free(old)
                if not free:
                    self._retired.setdefault(old.name, []).append(old)
        if free:
            self._free(old)
        return new

    def _free(self, version: AdapterVersion) -> None:
        """Give back a version's memory; delete its folder once ``keep_versions`` newer ones are on
        disk (the newest stays, so an unloaded name can be loaded again)."""
        with self._lock:
            retired = self._retired.get(version.name, [])
            if version in retired:
                retired.remove(version)
            if not retired:
                self._retired.pop(version.name, None)
        self._on_free(version)
        on_disk = self.store.versions(version.name) or [0]
        if version.version < on_disk[-min(self.keep_versions, len(on_disk))]:
            self.store.remove_version(version.name, version.version)
        elif self.keep_versions > 1:  # kept to roll back to: the oldest kept one may leave the window now
            self._prune(version.name)

    @staticmethod
    def _take_if_free(version: AdapterVersion) -> bool:
        """Under the lock: mark ``version`` freed if nobody needs it; True if the caller frees it."""
        if version.current or version.refcount or version.holds or version.freed:
            return False
        version.freed = True
        return True
