"""Which versions have their fold folder on disk: written on a version's first request, and at most
``max_folders`` of them kept, the least recently used idle ones removed beyond that.

vLLM reads a LoRA's folder (``lora_path``) only when it loads that LoRA into its CPU cache: in
``LRUCacheWorkerLoRAManager.add_adapter``, for a scheduled request whose LoRA id it does not hold
(vllm/lora/worker_manager.py). A folder is therefore needed from a request's admission until vLLM
has finished or aborted it, and may go once no request of its version runs or waits, provided vLLM
has processed those ends first: ``remove`` drops the LoRA from vLLM (``remove_lora`` reaches the
engine core after every abort sent before it) and only then deletes the folder. A version asked for
again is folded again. Folders of versions with a request in flight are never removed, so the bound
is exceeded while more versions than ``max_folders`` are in flight.

Everything here runs on the vLLM loop (one thread); the folds themselves run in worker threads.
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
    removal: asyncio.Task | None = None  # its removal, once begun


class FoldCache:
    """Fold folders of :class:`VllmResidency`'s versions, by LoRA id, least recently used first.

    Args:
        residency: gives each version's folder (``path``).
        max_folders: folders of idle versions kept on disk (> 0).
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

    def users(self, lora_id: int) -> int:
        """Requests of version ``lora_id`` in flight."""
        folder = self._folders.get(lora_id)
        return folder.users if folder is not None else 0

    async def use(self, version) -> None:
        """Make sure ``version``'s folder is on disk for one more request (pair with :meth:`done`).
        Concurrent first requests of a version fold it once; a request for a version whose folder is
        being removed waits for the removal, then folds it again.

        Raises:
            AdapterError: the fold cannot be written (e.g. a full disk); nothing of it is left and
                the next request tries again.
            CancelledError: the request was cancelled meanwhile (the fold goes on for the others).
        """
        lora_id = version.slot
        while (entry := self._folders.get(lora_id)) is not None and entry.removal is not None:
            await asyncio.shield(entry.removal)
        if entry is None:
            out = self._residency.path(lora_id)
            fold = asyncio.get_running_loop().run_in_executor(None, write_folded_lora, version.adapter, out)
            entry = self._folders[lora_id] = _Folder(fold)
        self._folders.move_to_end(lora_id)
        entry.users += 1
        try:
            await asyncio.shield(entry.fold)
        except BaseException:
            entry.users -= 1
            if entry.fold.done() and entry.fold.exception() is not None and self._folders.get(lora_id) is entry:
                del self._folders[lora_id]  # failed: the next request folds again
            raise
        self._trim()

    def done(self, lora_id: int) -> None:
        """One request of ``lora_id`` has ended in vLLM (after a successful :meth:`use`)."""
        entry = self._folders.get(lora_id)
        if entry is not None:
            entry.users -= 1
            self._trim()

    def forget(self, lora_id: int) -> None:
        """A freed version: the engine removes its folder itself."""
        self._folders.pop(lora_id, None)

    def _trim(self) -> None:
        """Begin removing the least recently used idle folders beyond ``max_folders``."""
        kept = [(i, f) for i, f in self._folders.items() if f.removal is None]
        excess = len(kept) - self.max_folders
        for lora_id, entry in kept:
            if excess <= 0:
                return
            if entry.users == 0 and entry.fold.done():
                entry.removal = asyncio.get_running_loop().create_task(self._evict(lora_id, entry))
                excess -= 1

    async def _evict(self, lora_id: int, entry: _Folder) -> None:
        try:
            await self._remove(lora_id, self._residency.path(lora_id))
        finally:
            if self._folders.get(lora_id) is entry:
                del self._folders[lora_id]
