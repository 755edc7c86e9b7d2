"""Which versions have their fold folder on disk: written on a version's first request, and at most
``max_folders`` of them on disk at any time, the least recently used idle ones removed to make room.

vLLM reads a LoRA's folder (``lora_path``) only when it loads that LoRA into its CPU cache: in
``LRUCacheWorkerLoRAManager.add_adapter``, for a scheduled request whose LoRA id it does not hold
(vllm/lora/worker_manager.py). A folder is therefore needed from a request's admission until vLLM
has finished or aborted it, and may go once no request of its version runs or waits, provided vLLM
has processed those ends first: ``remove`` drops the LoRA from vLLM (``remove_lora`` reaches the
engine core after every abort sent before it) and only then deletes the folder. A version asked for
again is folded again.

The bound holds while requests are in flight: a request whose version has no folder, when all
``max_folders`` folders are in use by requests of their versions (or still being removed), waits
(counted in :attr:`FoldCache.waiting`), first come first served, until one of them is idle and
removed, as vLLM's scheduler holds a request whose LoRA finds no free slot. So that busy versions
cannot keep it waiting for ever, the least recently used folders in use are drained meanwhile, one
per request waiting for room: they take no new request (those wait too, and fold their version
again once there is room) and go once the requests they have end. The folders live in the
temporary folder, often a tmpfs in containers, so a bound exceeded under load would take memory,
not disk. A bound under vLLM's ``max_loras`` leaves some of its LoRA slots unused.

Everything here runs on the vLLM loop (one thread, :attr:`FoldCache.waiting` aside: an int any
thread may read); the folds themselves run in worker threads.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.engine.vllm_backend.adapters import VllmResidency, write_folded_lora


@dataclass(slots=True)
class _Folder:
    fold: asyncio.Future  # its fold (a worker thread's), done once the folder is written
    users: int = 0  # requests of the version admitted and not ended in vLLM
    removal: asyncio.Task | None = None  # its removal, once begun (the folder counts until it ends)
    draining: bool = False  # room is needed: it takes no new request and goes once its requests end


class FoldCache:
    """Fold folders of :class:`VllmResidency`'s versions, by LoRA id, least recently used first.

    Args:
        residency: gives each version's folder (``path``).
        max_folders: folders on disk at most, in use or idle (> 0).
        remove: ``await remove(lora_id, folder)`` drops the LoRA from vLLM, then deletes the folder.

    Raises (constructor):
        ValueError: ``max_folders`` is not a positive integer.
    """

    def __init__(self, residency: VllmResidency, max_folders: int,
                 remove: Callable[[int, Path], Awaitable[None]]):
        if not isinstance(max_folders, int) or max_folders <= 0:
            raise ValueError(f"max_folders must be a positive integer; got {max_folders!r}")
        self._residency, self.max_folders, self._remove = residency, max_folders, remove
        self._folders: OrderedDict[int, _Folder] = OrderedDict()
        self.waiting = 0  # requests waiting for a folder to go before theirs can be written
        self._needing_room = 0  # those of them whose version has no folder (not a draining one)
        self._room = asyncio.Event()  # set (and replaced) whenever a folder has gone from disk

    def users(self, lora_id: int) -> int:
        """Requests of version ``lora_id`` in flight."""
        folder = self._folders.get(lora_id)
        return folder.users if folder is not None else 0

    async def use(self, version) -> None:
        """Make sure ``version``'s folder is on disk for one more request (pair with :meth:`done`).
        Concurrent first requests of a version fold it once; a request for a version whose folder is
        being removed waits for the removal, then folds it again; one whose version has no folder
        waits while ``max_folders`` folders are on disk, until one of them is idle and removed (and so
        does one whose folder is draining, until it has gone and there is room again).

        Raises:
            AdapterError: the fold cannot be written (e.g. a full disk); nothing of it is left and
                the next request tries again.
            CancelledError: the request was cancelled meanwhile (the fold goes on for the others).
        """
        lora_id, woken = version.slot, False
        while True:
            entry = self._folders.get(lora_id)
            if entry is not None and entry.removal is not None:
                await asyncio.shield(entry.removal)
            elif entry is not None and entry.draining:
                await self._wait_for_room(needs_room=False)  # until it has gone, or is needed no more
            elif entry is None and (len(self._folders) >= self.max_folders or (self._needing_room and not woken)):
                # first come, first served: a new request takes no room before those already waiting
                await self._wait_for_room(needs_room=True)
                woken = True
            else:
                break
        if entry is None:
            out = self._residency.path(lora_id)
            fold = asyncio.get_running_loop().run_in_executor(None, write_folded_lora, version.adapter, out)
            entry = self._folders[lora_id] = _Folder(fold)
            fold.add_done_callback(lambda _, entry=entry: self._folded(lora_id, entry))
        self._pass_room()
        self._folders.move_to_end(lora_id)
        entry.users += 1
        try:
            await asyncio.shield(entry.fold)
        except BaseException:
            entry.users -= 1
            if _failed(entry.fold):
                self._discard(lora_id, entry)  # the next request folds again
            raise
        self._trim()

    def done(self, lora_id: int) -> None:
        """One request of ``lora_id`` has ended in vLLM (after a successful :meth:`use`)."""
        entry = self._folders.get(lora_id)
        if entry is not None:
            entry.users -= 1
            self._trim()

    async def drop(self, lora_id: int) -> None:
        """A freed version (no request can ask for it again): drop it from vLLM and delete its
        folder, folded or not (a fold still running is waited for, else it wrote the folder after)."""
        entry = self._folders.get(lora_id)
        if entry is None:
            await self._remove(lora_id, self._residency.path(lora_id))
            return
        if entry.removal is None:
            entry.removal = asyncio.get_running_loop().create_task(self._evict(lora_id, entry))
        await asyncio.shield(entry.removal)

    async def _wait_for_room(self, needs_room: bool) -> None:
        room = self._room
        self.waiting, self._needing_room = self.waiting + 1, self._needing_room + needs_room
        try:
            self._trim()
            await room.wait()
        except asyncio.CancelledError:
            self.waiting, self._needing_room = self.waiting - 1, self._needing_room - needs_room
            self._trim()  # a folder drained for it may be needed no more
            self._pass_room()  # or it was woken and leaves its room to the next
            raise
        self.waiting, self._needing_room = self.waiting - 1, self._needing_room - needs_room

    def _pass_room(self) -> None:
        """Wake the waiting requests while room is left (one woken took none, or left some)."""
        if self._needing_room and len(self._folders) < self.max_folders:
            self._wake()

    def _wake(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    def _folded(self, lora_id: int, entry: _Folder) -> None:
        """A fold has ended: a failed one nobody waits for goes; a written one may be idle already
        (its requests were cancelled meanwhile), beyond the bound."""
        if _failed(entry.fold) and entry.users == 0:
            self._discard(lora_id, entry)
        else:
            self._trim()

    def _discard(self, lora_id: int, entry: _Folder) -> None:
        """Forget ``entry`` (its folder is gone, or was never written) and wake the requests waiting
        for room."""
        if self._folders.get(lora_id) is entry:
            del self._folders[lora_id]
            self._wake()

    def _trim(self) -> None:
        """Begin removing the least recently used idle folders beyond ``max_folders``, less one per
        request waiting for room; if that is not room enough, drain as many of the least recently
        used others (and undrain those needed no more)."""
        kept = [(i, f) for i, f in self._folders.items() if f.removal is None]
        excess = len(kept) + self._needing_room - self.max_folders
        for lora_id, entry in kept:
            if excess > 0 and entry.users == 0 and entry.fold.done():
                entry.removal = asyncio.get_running_loop().create_task(self._evict(lora_id, entry))
                excess -= 1
        undrained = False
        for _, entry in kept:
            if entry.removal is None:
                drain, excess = excess > 0, excess - 1
                undrained |= entry.draining and not drain
                entry.draining = drain
        if undrained:
            self._wake()  # its requests waiting may go on

    async def _evict(self, lora_id: int, entry: _Folder) -> None:
        try:
            await asyncio.wait([entry.fold])  # a fold still running would write the folder after
            await self._remove(lora_id, self._residency.path(lora_id))
        finally:
            self._discard(lora_id, entry)


def _failed(fold: asyncio.Future) -> bool:
    return fold.done() and (fold.cancelled() or fold.exception() is not None)
