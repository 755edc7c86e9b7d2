"""A model of what a disk keeps across a power loss, for the store's crash-replay test.

It replays the store's recorded file operations (:class:`nlora_serve.adapters.store.durable.FileOp`)
on inodes: a file's bytes survive only once the file was fsynced, a folder's entries (created,
renamed, linked, removed) only once the folder was fsynced; everything else is dropped. This is
the POSIX minimum an application may rely on (what ALICE, Pillai et al., OSDI 2014, calls the
weakest persistence model); real file systems keep more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Inode:
    is_dir: bool
    entries: dict[str, int] = field(default_factory=dict)  # volatile folder entries
    durable_entries: dict[str, int] = field(default_factory=dict)
    data: bytes = b""  # volatile file bytes
    durable_data: bytes = b""


class DiskModel:
    """The inodes under ``root``, starting from its current contents (taken as durable)."""

    def __init__(self, root: Path):
        self.root = root
        self.inodes: list[_Inode] = []
        self._root_id = self._snapshot(root)

    def _snapshot(self, path: Path) -> int:
        ino = self._new(path.is_dir())
        node = self.inodes[ino]
        if node.is_dir:
            for child in sorted(os.listdir(path)):
                node.entries[child] = self._snapshot(path / child)
            node.durable_entries = dict(node.entries)
        else:
            node.data = node.durable_data = path.read_bytes()
        return ino

    def _new(self, is_dir: bool) -> int:
        self.inodes.append(_Inode(is_dir))
        return len(self.inodes) - 1

    def _parts(self, path: Path) -> list[str]:
        return list(Path(path).relative_to(self.root).parts)

    def _lookup(self, path: Path) -> int:
        ino = self._root_id
        for part in self._parts(path):
            ino = self.inodes[ino].entries[part]
        return ino

    def _parent(self, path: Path) -> tuple[_Inode, str]:
        return self.inodes[self._lookup(Path(path).parent)], Path(path).name

    def apply(self, op) -> None:
        """Apply one recorded FileOp to the volatile state (ops outside the root are ignored)."""
        if not Path(op.path).is_relative_to(self.root):
            return
        if op.kind == "mkdir":
            parent, name = self._parent(op.path)
            parent.entries[name] = self._new(True)
        elif op.kind == "create":
            parent, name = self._parent(op.path)
            if name in parent.entries:
                self.inodes[parent.entries[name]].data = b""
            else:
                parent.entries[name] = self._new(False)
        elif op.kind == "write":
            self.inodes[self._lookup(op.path)].data = op.data
        elif op.kind == "fsync_file":
            node = self.inodes[self._lookup(op.path)]
            node.durable_data = node.data
        elif op.kind == "fsync_dir":
            node = self.inodes[self._lookup(op.path)]
            node.durable_entries = dict(node.entries)
        elif op.kind == "link":
            parent, name = self._parent(op.target)
            parent.entries[name] = self._lookup(op.path)
        elif op.kind == "rename":
            src_parent, src_name = self._parent(op.path)
            dst_parent, dst_name = self._parent(op.target)
            dst_parent.entries[dst_name] = src_parent.entries.pop(src_name)
        elif op.kind == "unlink":
            parent, name = self._parent(op.path)
            del parent.entries[name]
        else:
            raise ValueError(f"unknown file operation {op.kind!r}")

    def after_power_loss(self, target: Path) -> None:
        """Write what survives a power loss now (durable entries and bytes only) under ``target``."""
        self._materialize(self._root_id, target, set())

    def _materialize(self, ino: int, path: Path, seen: set[int]) -> None:
        node = self.inodes[ino]
        if not node.is_dir:
            path.write_bytes(node.durable_data)
            return
        path.mkdir(exist_ok=True)
        if ino in seen:  # a folder reachable twice (renamed, both parents fsynced): keep one copy
            return
        seen.add(ino)
        for name, child in node.durable_entries.items():
            self._materialize(child, path / name, seen)
