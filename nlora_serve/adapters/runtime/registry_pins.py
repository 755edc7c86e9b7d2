"""Request pins on registered versions: the reference counts that keep a version alive (DESIGN §3).

A request pins the version current at its admission (:meth:`RegistryPins.acquire`) and releases it
exactly once on every terminal path (:meth:`RegistryPins.release`). A response made of several
engine requests holds its version (:meth:`RegistryPins.hold`) while it queues them one by one, each
pinned with :meth:`RegistryPins.acquire_held`, and lets it go after (:meth:`RegistryPins.let_go`).
:meth:`RegistryPins.holders` and :meth:`RegistryPins.to_come` count what an unload lets drain.
"""

from __future__ import annotations

from nlora_serve.adapters.runtime.version import AdapterNotFound, AdapterVersion, Hold
from nlora_serve.errors import shown


class RegistryPins:
    """The pinning half of :class:`~nlora_serve.adapters.runtime.registry.AdapterRegistry` (a mixin).

    It reads and changes, under ``self._lock``, the versions in ``self._current`` (name -> current
    version) and ``self._retired`` (name -> superseded or unloaded versions still held), and frees a
    version through ``self._take_if_free`` / ``self._free``; ``self._missing(name)`` words the
    NOT_FOUND message. The registry owns all of these.
    """

    def acquire(self, name: str) -> AdapterVersion:
        """Pin the current version of ``name`` for one request (refcount + 1).

        Raises:
            AdapterNotFound: ``name`` is not registered, or was unloaded (the message says which).
        """
        with self._lock:
            found = self._current.get(name)
            if found is not None:
                found.refcount += 1
                return found
        raise AdapterNotFound(self._missing(name))  # outside the lock: it may read the disk

    def acquire_held(self, held: Hold) -> AdapterVersion:
        """Pin the version ``held`` keeps (:meth:`hold`), current or not, for one of its requests
        (refcount + 1, ``to_come`` - 1), so that every request of one response runs on it.

        Raises:
            AdapterNotFound: its name was force-unloaded since (the engine aborts the requests on
                it: one queued after must not run; the message names the version, whatever the name
                serves now).
            RuntimeError: more requests pinned through ``held`` than it was taken for, or one
                after it was let go (never hidden).
        """
        version = held.version
        with self._lock:
            if held.to_come <= 0:
                raise RuntimeError(f"adapter {version.name} v{version.version}: a request pinned through a hold "
                                   "with none to come (more than it was taken for, or let go)")
            if not version.unloaded:  # (held: never freed)
                version.refcount += 1
                held.to_come -= 1
                version.to_come -= 1
                return version
        raise AdapterNotFound(f"adapter {shown(version.name)!r} v{version.version} was unloaded by an operator "
                              "(UnloadAdapter force=true) while this response's requests were being queued")

    def hold(self, name: str, requests: int) -> Hold:
        """Keep the current version of ``name`` from being freed (not a request: ``refcount`` and
        :meth:`holders` do not count it) until :meth:`let_go`, for the ``requests`` requests of one
        response that :meth:`acquire_held` pins on it one at a time (:meth:`to_come` counts those
        not pinned yet).

        Raises:
            AdapterNotFound: as :meth:`acquire`.
            ValueError: ``requests`` below 1.
        """
        if requests < 1:
            raise ValueError(f"a hold is taken for at least one request; got {requests}")
        with self._lock:
            found = self._current.get(name)
            if found is not None:
                found.holds += 1
                found.to_come += requests
                return Hold(found, requests)
        raise AdapterNotFound(self._missing(name))

    def let_go(self, held: Hold) -> None:
        """End a :meth:`hold`: its requests not pinned yet will not be; frees the version if
        nothing else needs it.

        Raises:
            RuntimeError: let go twice (never hidden).
        """
        version = held.version
        with self._lock:
            if held.let_go:
                raise RuntimeError(f"adapter {version.name} v{version.version} let go more often than held")
            held.let_go = True
            version.holds -= 1
            version.to_come -= held.to_come
            held.to_come = 0
            free = self._take_if_free(version)
        if free:
            self._free(version)

    def release(self, version: AdapterVersion) -> None:
        """Drop one request's pin; frees the version if it was its last holder and not current.

        Raises:
            RuntimeError: released more often than acquired (a refcount bug, never hidden).
        """
        with self._lock:
            if version.refcount <= 0:
                raise RuntimeError(f"adapter {version.name} v{version.version} released more "
                                   "often than acquired")
            version.refcount -= 1
            free = self._take_if_free(version)
        if free:
            self._free(version)

    def unload(self, name: str, force: bool = False) -> AdapterVersion:
        """Stop serving ``name``: new acquires raise :class:`AdapterNotFound` at once; the version
        is freed when its last holder releases. Its files stay in the store. With ``force`` (the
        engine aborts the requests on every version of ``name``), :meth:`acquire_held` refuses
        its versions too; without, a response holding one queues the rest of its requests on it.

        Returns the unloaded version (the engine aborts its holders for a forced unload). The
        store records the unload, so a restart does not serve the name again until a new version
        is registered (e.g. LoadAdapter of the stored files).

        Raises:
            AdapterNotFound: ``name`` is not registered.
            StoreWriteError: the store's disk refused the record (the name serves on).
        """
        with self._write_lock:  # no registration of ``name`` between the store's record and the switch
            with self._lock:
                known = name in self._current
            if not known:
                raise AdapterNotFound(self._missing(name))
            self.store.mark_unloaded(name)  # first: should the disk refuse it, the name serves on
            with self._lock:
                found = self._current.pop(name)
                found.current = False
                for version in (found, *self._retired.get(name, ())) if force else ():
                    version.unloaded = True
                free = self._take_if_free(found)
                if not free:
                    self._retired.setdefault(name, []).append(found)
        if free:
            self._free(found)
        return found

    def holders(self, name: str) -> int:
        """Requests holding any version of ``name`` now: the current one and older ones that
        requests admitted before a swap or an unload still run on."""
        with self._lock:
            held = [v for v in (self._current.get(name), *self._retired.get(name, ())) if v is not None]
            return sum(v.refcount for v in held)

    def to_come(self, name: str) -> int:
        """Requests the responses holding any version of ``name`` (:meth:`hold`) have still to
        queue on it: with :meth:`holders`, the requests an unload without force lets run."""
        with self._lock:
            return sum(v.to_come for v in (self._current.get(name), *self._retired.get(name, ())) if v is not None)
