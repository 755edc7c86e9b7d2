"""Every scheduled sequence's block table in one persistent host tensor, written only when it changes.

Padding each sequence's Python block list into a fresh [S, W] tensor every step cost ~100-230 µs
at 256 decode sequences (``batch_info.pad_tables``). Here each sequence owns a row of one int32
table that lives across steps; a step writes only the entries that changed since the sequence
was last scheduled (one new block at a block boundary; the whole row at admission, after a
preemption or on a new row) and gathers the step's rows in batch order with one ``index_select``.
vLLM's model runner keeps such a table per request (``vllm/v1/worker/block_table.py``); nano-vllm
pads per step as we did.

What a row mirrors, and when it is rewritten (the scheduler's invariants, scheduler.py):
- a running sequence's block list only grows, by appending (``BlockManager.grow``);
- any other change frees the whole list first: preemption (``Sequence.num_preemptions`` goes up,
  and a re-admission with prefix-cache hits starts a new list) or the end of the request
  (its status becomes FINISHED and it is never scheduled again).
So a row is up to date while the sequence's preemption count and list length are those it was
written with; otherwise the tail (same count, longer list) or the whole row is rewritten.

The table itself is not pinned: nothing copies it to a device. A step's gathered rows travel in
the step's pinned staging buffer with every other input (step_inputs.py).
"""

from __future__ import annotations

import torch

from nlora_serve.engine.model.batch_info import ints
from nlora_serve.engine.scheduling.sequence import Sequence


class BlockTables:
    """Rows of block tables, one per sequence, grown (rows and width doubled) when short.

    Args:
        rows: rows to start with (grown as needed). width: blocks per row to start with.
    """

    def __init__(self, rows: int = 64, width: int = 16) -> None:
        self.table = torch.zeros(rows, width, dtype=torch.int32)  # [rows, width]; past a row's length: 0
        self._np = self.table.numpy()  # the same memory: element writes at numpy's cost, not torch's
        self._len = [0] * rows  # blocks written in each row (the rest of the row is 0)
        self._free = list(range(rows - 1, -1, -1))  # free rows, popped from the end
        # sequence -> [row, blocks mirrored, its num_preemptions when written]
        self._state: dict[Sequence, list[int]] = {}

    def gather(self, seqs: list[Sequence], multiple: int = 1) -> torch.Tensor:
        """[S, W] int32 block tables of ``seqs`` in this order, padded with block 0, W = the
        longest table (0 for none) rounded up to a multiple of ``multiple`` (a device step's rows:
        step_inputs.TABLE_WIDTH_STEP): equal to padding each ``seq.block_table``. Brings every row up
        to date first (see the module docstring for when a row is rewritten)."""
        if len(self._free) < len(seqs):
            self._reclaim(seqs)
        state, rows, width = self._state, [], 0
        for seq in seqs:
            st = state.get(seq)
            n = len(seq.block_table)
            if st is None or st[1] != n or st[2] != seq.num_preemptions:
                st = self._write(seq, st)
            rows.append(st[0])
            if n > width:
                width = n
        width += -width % multiple
        if width > self.table.shape[1]:  # the padding's columns: zero, as every row's tail is
            self._resize(self.table.shape[0], width)
        return self.table[:, :width].index_select(0, ints(rows))

    def release(self, seq: Sequence) -> None:
        """Free the row of a sequence that ended (no-op if it has none): the row would otherwise keep
        the sequence, its token ids and prefix-cache hashes alive until rows ran short."""
        st = self._state.pop(seq, None)
        if st is not None:
            self._free.append(st[0])

    def row(self, seq: Sequence) -> int | None:
        """The row ``seq`` owns, or None (never gathered, or reclaimed since)."""
        st = self._state.get(seq)
        return None if st is None else st[0]

    def _write(self, seq: Sequence, st: list[int] | None) -> list[int]:
        """Bring ``seq``'s row up to date: its new tail, or the whole row."""
        blocks = seq.block_table
        n = len(blocks)
        if st is None:
            st = self._state[seq] = [self._free.pop(), 0, seq.num_preemptions]
        start = st[1] if st[2] == seq.num_preemptions and st[1] <= n else 0
        if n > self.table.shape[1]:
            self._resize(self.table.shape[0], max(n, 2 * self.table.shape[1]))
        row = st[0]
        if n == start + 1:  # the common case, one block appended: a scalar write is ~5x cheaper
            self._np[row, start] = blocks[start]
        elif n > start:
            self._np[row, start:n] = blocks[start:n]
        if self._len[row] > n:  # a shorter list than the row held: clear what is left of the old one
            self._np[row, n:self._len[row]] = 0
        self._len[row] = n
        st[1], st[2] = n, seq.num_preemptions
        return st

    def _reclaim(self, seqs: list[Sequence]) -> None:
        """Free the rows of every sequence not in this step (finished ones, and any other: one that
        is scheduled again later gets a row anew and written whole), then grow the table until each
        of ``seqs`` can have a row. Runs only when rows are short, so at most once every ~S finished
        sequences once the table holds twice the largest step (it grows to that)."""
        step = set(seqs)
        for seq in [s for s in self._state if s not in step]:
            self._free.append(self._state.pop(seq)[0])
        rows = self.table.shape[0]
        if len(self._free) < len(seqs):
            self._resize(max(2 * rows, rows + len(seqs) - len(self._free)), self.table.shape[1])

    def _resize(self, rows: int, width: int) -> None:
        old = self.table
        self.table = torch.zeros(rows, width, dtype=torch.int32)
        self.table[:old.shape[0], :old.shape[1]] = old
        self._np = self.table.numpy()
        self._free[:0] = range(rows - 1, old.shape[0] - 1, -1)
        self._len += [0] * (rows - old.shape[0])
