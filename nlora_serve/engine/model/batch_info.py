"""The per-step attention metadata: one dataclass the model reads, built once per step.

Token order in a step: sequences with one query token (decodes) first, then prefill chunks.
The model sees ``(input_ids [T], positions [T])`` plus this object; nothing else about the step.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from itertools import chain

import torch


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's multi-token chunk inside the packed batch."""

    start: int  # first token of the chunk in the packed batch
    end: int  # one past its last token; query length q = end - start
    context_len: int  # tokens attended to: cached prefix + this chunk (c >= q)
    block_ids: torch.Tensor  # [ceil(c / block_size)] int64 KV blocks holding the context
    mask: torch.Tensor | None  # [q, c] bool, True = may attend; None: no cached prefix, plain causal


@dataclass(slots=True)
class BatchInfo:
    """Everything about one forward step except the token ids and positions.

    Shapes: T packed tokens, S scheduled sequences, N = num_decodes single-token sequences,
    B max blocks of a decode sequence, L = B * block_size, W max blocks of any sequence,
    R ≤ S logits rows, one per sequence whose last token's logits the step computes (those that
    sample after it).
    """

    query_starts: torch.Tensor  # [S + 1] int64: sequence i owns tokens [query_starts[i], query_starts[i+1])
    context_lens: torch.Tensor  # [S] int64: tokens in the KV cache after this step, per sequence
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block * block_size + offset) each token writes
    logits_indices: torch.Tensor  # [R] int64: packed index of the last token of each sequence that samples
    num_decodes: int  # N: sequences 0..N-1 have one query token each; their tokens are 0..N-1
    # the gather layout, read by the torch SDPA attention (engine/model/attention/cpu.py) only; a step built
    # for the Triton attention leaves them None / empty (engine/runner/step_inputs.py, gather_layout=False)
    decode_block_tables: torch.Tensor | None  # [N, B] int64 block tables, padded with block 0 (masked out)
    decode_mask: torch.Tensor | None  # [N, 1, 1, L] bool: True where the key position is < the context length
    prefills: list[PrefillChunk]  # sequences N..S-1, in packed order
    # read by the Triton attention (engine/model/attention/cuda.py); the kernels read these on the device
    block_tables: torch.Tensor  # [S, W] int32 every sequence's block table, padded with block 0 (never read)
    max_query_len: int  # longest prefill chunk (tokens), sizes the prefill grid; 0 without prefills
    decode_splits: int  # KV splits per decode sequence: the decode grid's fixed third dimension

    def to(self, device: torch.device) -> BatchInfo:
        """The same layout with every tensor on ``device`` (host ints stay host ints)."""
        return _move(self, device)


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, (BatchInfo, PrefillChunk)):
        return type(value)(**{f.name: _move(getattr(value, f.name), device) for f in fields(value)})
    return value


def build_batch_info(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                     samples: list[bool], block_size: int, decode_splits: int = 1) -> BatchInfo:
    """Lay out one step on the host (CPU tensors, gather layout included). Decodes (query length 1)
    must come first.

    Args:
        query_lens: tokens computed this step per sequence. context_lens: cached + new, per sequence.
        block_tables: each sequence's KV blocks (covering its context). samples: whether each
            sequence samples a token after this step (its chunk reaches its last token).
        decode_splits: KV splits of the Triton decode attention, fixed per engine so the grid
            does not change from step to step (``kernels.paged_decode_attention.decode_num_splits``
            of max_model_len); the CPU attention ignores it.
    """
    qlens = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    layout = flat_layout(qlens, ctx - qlens, pad_tables(block_tables), torch.tensor(samples, dtype=torch.bool),
                         block_size)
    n = layout.num_decodes
    tables, mask = decode_tables(layout.block_tables[:n], [len(t) for t in block_tables[:n]], ctx[:n], block_size)
    starts = layout.query_starts.tolist()
    prefills = [prefill_chunk(starts[i], starts[i + 1], context_lens[i], block_tables[i], block_size)
                for i in range(n, len(query_lens))]
    return BatchInfo(query_starts=layout.query_starts, context_lens=ctx, slot_mapping=layout.slot_mapping,
                     logits_indices=layout.logits_indices, num_decodes=n, decode_block_tables=tables,
                     decode_mask=mask, prefills=prefills, block_tables=layout.block_tables,
                     max_query_len=layout.max_query_len, decode_splits=decode_splits)


def ints(values) -> torch.Tensor:
    """A 1-D int64 tensor from an iterable of ints (through ``array``: several times faster than
    ``torch.tensor`` of a list)."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)


def pad_tables(tables: list[list[int]]) -> torch.Tensor:
    """[S, W] int32 block tables padded with block 0 (W = the longest), from one flat copy. The
    engine's steps gather them from a persistent table instead (engine/runner/block_tables.py)."""
    lens = ints([len(t) for t in tables])
    width = int(lens.max()) if lens.numel() else 0
    padded = torch.zeros(len(tables), width, dtype=torch.int32)
    padded[torch.arange(width) < lens.unsqueeze(1)] = ints(list(chain.from_iterable(tables))).to(torch.int32)
    return padded


@dataclass(slots=True)
class FlatLayout:
    """The per-token and per-sequence index tensors of a step (host, int64 but for the int32 block
    tables), built without token loops."""

    positions: torch.Tensor  # [T] position of each packed token in its sequence
    query_starts: torch.Tensor  # [S + 1] as in BatchInfo
    slot_mapping: torch.Tensor  # [T] flat KV slot each token writes
    logits_indices: torch.Tensor  # [R] last token of each sampling sequence
    block_tables: torch.Tensor  # [S, W] int32 block tables padded with block 0
    num_decodes: int  # N leading single-token sequences
    max_query_len: int  # longest prefill chunk, 0 without prefills


def flat_layout(qlens: torch.Tensor, computed: torch.Tensor, padded: torch.Tensor, samples: torch.Tensor,
                block_size: int) -> FlatLayout:
    """Vectorised layout: ``qlens``, ``computed`` [S] int64 (new and cached tokens per sequence),
    ``padded`` [S, W] int32 block tables padded with block 0 (:func:`pad_tables`, or rows of
    :class:`~nlora_serve.engine.runner.block_tables.BlockTables`), ``samples`` [S] bool. Every per-token
    quantity is a tensor op."""
    starts = torch.zeros(qlens.numel() + 1, dtype=torch.long)
    torch.cumsum(qlens, 0, out=starts[1:])
    num = int(starts[-1])
    owner = torch.repeat_interleave(torch.arange(qlens.numel()), qlens, output_size=num)  # [T] sequence index
    positions = computed[owner] + torch.arange(num) - starts[owner]
    kv_slots = padded[owner, positions // block_size].long() * block_size + positions % block_size
    not_one = (qlens != 1).nonzero()
    n = int(not_one[0, 0]) if not_one.numel() else qlens.numel()
    return FlatLayout(positions, starts, kv_slots, starts[1:][samples] - 1, padded, n,
                      int(qlens[n:].max()) if n < qlens.numel() else 0)


def decode_tables(padded: torch.Tensor, num_blocks: list[int], context_lens: torch.Tensor,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather layout of N decodes: ``padded`` [N, W] int32 tables (padded with block 0),
    ``num_blocks`` each one's table length, ``context_lens`` [N] int64. Returns the tables cut to
    the longest decode table [N, B] int64 and the key mask [N, 1, 1, B * block_size] bool."""
    width = max(num_blocks, default=0)
    tables = padded[:, :width].to(torch.long, memory_format=torch.contiguous_format)
    keys = torch.arange(width * block_size)
    mask = keys.unsqueeze(0) < context_lens.unsqueeze(1)
    return tables, mask.view(len(num_blocks), 1, 1, width * block_size)


def prefill_chunk(start: int, end: int, context_len: int, table: list[int], block_size: int) -> PrefillChunk:
    """The :class:`PrefillChunk` of packed tokens ``[start, end)`` whose sequence holds ``context_len``
    tokens after this step (cached prefix + chunk), its KV blocks in ``table``: block ids cut to the
    ``ceil(context_len / block_size)`` that hold them, and the [q, context_len] causal mask, or None
    when the chunk is the whole context (no cached prefix: plain causal attention)."""
    q = end - start
    blocks = torch.tensor(table[: -(-context_len // block_size)], dtype=torch.long)
    if q == context_len:
        return PrefillChunk(start, end, context_len, blocks, None)
    # query i sits at position context_len - q + i and sees keys 0 .. that position
    rows = torch.arange(context_len - q, context_len).unsqueeze(1)
    mask = torch.arange(context_len).unsqueeze(0) <= rows
    return PrefillChunk(start, end, context_len, blocks, mask)
