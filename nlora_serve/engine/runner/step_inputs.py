"""One step's model inputs from a few tensor ops and one host-to-device copy.

Every integer a step needs (token ids, positions, query starts, context lengths, KV slot mapping,
logits indices, block tables, and any extra per-token rows such as adapter slots) is written into
one int32 host buffer (pinned when the target is a GPU), copied to the device in one
``copy_(non_blocking=True)``, and read there as views. On the CPU there is no copy: the host
tensors are used as built (int64, the block tables int32). Nothing loops over tokens in Python: the
loops are per sequence (their counts and new token ids), everything per token is a tensor op. Block
tables are rows of a persistent table written only when a sequence's blocks change
(engine/runner/block_tables.py), gathered in the step's order.

With async scheduling a step is built while the step before it may still be queued on the device,
its copy out of the staging buffer not yet done: so two pinned buffers take turns. The engine reads
step n-1's tokens back (waiting on an event recorded after step n-1's copy) before it builds step
n+1, so the buffer step n+1 reuses is free by then. A token whose id is a placeholder (sampled by
the step in flight, engine/sample/step_output.py) is gathered on the device from that step's tokens.
"""

from __future__ import annotations

from itertools import chain

import torch

from nlora_serve.engine.model.batch_info import BatchInfo, decode_tables, flat_layout, ints, prefill_chunk
from nlora_serve.engine.runner.block_tables import BlockTables
from nlora_serve.engine.scheduling.sequence import Sequence

_I32, _I64 = torch.int32, torch.int64
TABLE_WIDTH_STEP = 16  # a device step's block-table rows are padded to a multiple of this many blocks


class StepInputs:
    """Builds ``(input_ids [T], positions [T], BatchInfo, extra rows)`` for one device.

    Args:
        block_size: tokens per KV block. decode_splits: the Triton decode grid's KV splits.
        device: where the model runs. gather_layout: also build the host-side decode gather
            tables, masks and prefill chunks (the torch SDPA attention reads them; the Triton
            attention does not, so a device step carries only the flat tensors).
    """

    def __init__(self, block_size: int, decode_splits: int, device: torch.device, gather_layout: bool) -> None:
        self.block_size = block_size
        self.decode_splits = decode_splits
        self.device = torch.device(device)
        self.gather_layout = gather_layout
        self._pinned = self.device.type == "cuda"
        self._hosts = [torch.empty(0, dtype=_I32), torch.empty(0, dtype=_I32)]  # staging, in turn (grown only)
        self._turn = 0
        self._dev = torch.empty(0, dtype=_I32, device=self.device)
        self.tables = BlockTables()  # every scheduled sequence's block table, kept across steps

    def build(self, pairs: list[tuple[Sequence, int]], extra: list[torch.Tensor] = (), previous=None,
              scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, BatchInfo, list[torch.Tensor]]:
        """Lay out one step of ``(sequence, new tokens)`` pairs, decodes (1 token) first.

        ``extra``: [T] int32 host rows (e.g. each token's adapter slot) carried in the same copy.
        ``previous``: the step in flight (:class:`~nlora_serve.engine.sample.step_output.SampledStep`);
        a sequence whose last token is a placeholder takes it from ``previous.tokens``.
        ``scored``: [P] int64 packed indices of prompt positions to score
        (:class:`~nlora_serve.engine.sample.prompt_logprobs.PromptRows`), appended to the logits indices
        after the sampling rows.
        Returns int64 ``input_ids`` [T], ``positions`` [T], the :class:`BatchInfo`, and the extra
        rows on the device (int32 views of the step buffer).
        """
        seqs = [s for s, _ in pairs]
        qlens = ints([n for _, n in pairs])
        computed = ints([s.num_computed_tokens for s in seqs])
        ctx = computed + qlens
        samples = ctx == ints([len(s.token_ids) for s in seqs])
        # on a device, rows of 16k blocks gathered as such (_copy says why): no second copy to pad them
        multiple = 1 if self.device.type == "cpu" else TABLE_WIDTH_STEP
        layout = flat_layout(qlens, computed, self.tables.gather(seqs, multiple), samples, self.block_size)
        ids = ints(list(chain.from_iterable(
            s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n] for s, n in pairs)))
        logits_indices = layout.logits_indices if scored is None else torch.cat([layout.logits_indices, scored])
        wide = [ids, layout.positions, layout.query_starts, ctx, layout.slot_mapping, logits_indices]
        feed = _feed_rows(pairs, samples, layout.query_starts, previous)
        wide, tables32, rows = self._copy(wide, layout.block_tables, list(extra) + ([feed] if feed is not None else []))
        input_ids, positions, starts, ctx_d, kv_slots, logits_idx = wide
        if feed is not None:  # placeholders: the step in flight's tokens, gathered on the device
            src = rows.pop()
            input_ids = torch.where(src >= 0, previous.tokens[src.clamp(min=0).long()], input_ids)
        n = layout.num_decodes
        info = BatchInfo(query_starts=starts, context_lens=ctx_d, slot_mapping=kv_slots, logits_indices=logits_idx,
                         num_decodes=n, decode_block_tables=None, decode_mask=None, prefills=[],
                         block_tables=tables32, max_query_len=layout.max_query_len,
                         decode_splits=self.decode_splits)
        if self.gather_layout:
            tables = [s.block_table for s in seqs]
            info.decode_block_tables, info.decode_mask = decode_tables(
                layout.block_tables[:n], [len(t) for t in tables[:n]], ctx[:n], self.block_size)
            bounds = layout.query_starts.tolist()
            info.prefills = [prefill_chunk(bounds[i], bounds[i + 1], int(ctx[i]), tables[i], self.block_size)
                             for i in range(n, len(seqs))]
            info = info.to(self.device)  # a no-op for what is already there
        return input_ids, positions, info, rows

    def _copy(self, flat: list[torch.Tensor], tables: torch.Tensor, extra: list[torch.Tensor]):
        """Pack into the staging buffer, one copy to the device, split into views there.

        On a device the block tables start on a 16-byte boundary and their rows come padded (block
        0, never read; by :meth:`BlockTables.gather`) to a multiple of :data:`TABLE_WIDTH_STEP`
        blocks: the attention kernels' Triton compile key holds the tables' alignment and row stride
        (a stride of 1 is a constant, one of 16k a divisibility hint), and with the step's own offset
        and width they were compiled again mid-serving for each combination a step met."""
        if self.device.type == "cpu":  # no copy: int64 tensors as they are, int32 tables
            return flat, tables, [t.to(_I32) for t in extra]
        sizes = [t.numel() for t in flat]
        n64 = sum(sizes)
        at_tables = n64 + (-n64 % 4)  # int32 elements: 16 bytes
        total = at_tables + tables.numel() + sum(t.numel() for t in extra)
        self._turn ^= 1
        host = self._hosts[self._turn]
        if host.numel() < total:
            host = self._hosts[self._turn] = torch.empty(max(total, 2 * host.numel()), dtype=_I32,
                                                         pin_memory=self._pinned)
        if self._dev.numel() < total:
            self._dev = torch.empty(max(total, 2 * self._dev.numel()), dtype=_I32, device=self.device)
        gap = [torch.zeros(at_tables - n64, dtype=_I32)] if at_tables > n64 else []
        torch.cat([*flat, *gap, tables.view(-1), *extra], out=host[:total])
        dev = self._dev[:total]
        dev.copy_(host[:total], non_blocking=True)
        wide = dev[:n64].long().split(sizes)  # one widening op for every index the model needs in int64
        tables32 = dev[at_tables:at_tables + tables.numel()].view(tables.shape)
        rows, at = [], at_tables + tables.numel()
        for t in extra:
            rows.append(dev[at:at + t.numel()])
            at += t.numel()
        return list(wide), tables32, rows


def _feed_rows(pairs: list[tuple[Sequence, int]], samples: torch.Tensor, query_starts: torch.Tensor,
               previous) -> torch.Tensor | None:
    """[T] int32: for the token that is a placeholder (the last of a sequence whose chunk reaches
    its end), its row in ``previous.tokens``; -1 elsewhere. None when no token is a placeholder."""
    if previous is None:
        return None
    rows = ints([previous.row_of(s) if s.token_ids[-1] < 0 else -1 for s, _ in pairs])
    rows = torch.where(samples, rows, -1)
    if not bool((rows >= 0).any()):
        return None
    feed = torch.full((int(query_starts[-1]),), -1, dtype=_I32)
    feed[query_starts[1:] - 1] = rows.to(_I32)
    return feed
