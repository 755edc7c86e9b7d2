"""The per-step attention metadata: one dataclass the model reads, built once per step.

Token order in a step: sequences with one query token (decodes) first, then prefill chunks.
The model sees ``(input_ids [T], positions [T])`` plus this object; nothing else about the step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    B max blocks of a decode sequence, L = B * block_size, W max blocks of any sequence.
    """

    query_starts: torch.Tensor  # [S + 1] int64: sequence i owns tokens [query_starts[i], query_starts[i+1])
    context_lens: torch.Tensor  # [S] int64: tokens in the KV cache after this step, per sequence
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block * block_size + offset) each token writes
    logits_indices: torch.Tensor  # [R] int64: packed index of the last token of each sequence that samples
    num_decodes: int  # N: sequences 0..N-1 have one query token each; their tokens are 0..N-1
    decode_block_tables: torch.Tensor  # [N, B] int64 block tables, padded with block 0 (masked out)
    decode_mask: torch.Tensor  # [N, 1, 1, L] bool: True where the key position is < the context length
    prefills: list[PrefillChunk]  # sequences N..S-1, in packed order
    # read by the Triton attention (engine/attention/cuda.py); the kernels read these on the device
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
    """Lay out one step. Decodes (query length 1) must come first.

    Args:
        query_lens: tokens computed this step per sequence. context_lens: cached + new, per sequence.
        block_tables: each sequence's KV blocks (covering its context). samples: whether each
            sequence samples a token after this step (its chunk reaches its last token).
        decode_splits: KV splits of the Triton decode attention, fixed per engine so the grid
            does not change from step to step (``kernels.paged_decode_attention.decode_num_splits``
            of max_model_len); the CPU attention ignores it.
    """
    starts = [0]
    slots: list[int] = []
    for q, c, table in zip(query_lens, context_lens, block_tables):
        starts.append(starts[-1] + q)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c - q, c))
    num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
    logits_indices = [starts[i + 1] - 1 for i, s in enumerate(samples) if s]
    tables, mask = _decode_tables(block_tables[:num_decodes], context_lens[:num_decodes], block_size)
    prefills = [_prefill_chunk(starts[i], starts[i + 1], context_lens[i], block_tables[i], block_size)
                for i in range(num_decodes, len(query_lens))]
    return BatchInfo(query_starts=torch.tensor(starts), context_lens=torch.tensor(context_lens),
                     slot_mapping=torch.tensor(slots, dtype=torch.long),
                     logits_indices=torch.tensor(logits_indices, dtype=torch.long),
                     num_decodes=num_decodes, decode_block_tables=tables, decode_mask=mask,
                     prefills=prefills, block_tables=_all_tables(block_tables),
                     max_query_len=max(query_lens[num_decodes:], default=0), decode_splits=decode_splits)


def _all_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32).view(len(tables), width)


def _decode_tables(tables: list[list[int]], context_lens: list[int],
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(t) for t in tables), default=0)
    padded = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    keys = torch.arange(width * block_size)
    mask = keys.unsqueeze(0) < torch.tensor(context_lens, dtype=torch.long).unsqueeze(1)
    return padded, mask.view(len(tables), 1, 1, width * block_size)


def _prefill_chunk(start: int, end: int, context_len: int, table: list[int], block_size: int) -> PrefillChunk:
    q = end - start
    blocks = torch.tensor(table[: -(-context_len // block_size)], dtype=torch.long)
    if q == context_len:
        return PrefillChunk(start, end, context_len, blocks, None)
    # query i sits at position context_len - q + i and sees keys 0 .. that position
    rows = torch.arange(context_len - q, context_len).unsqueeze(1)
    mask = torch.arange(context_len).unsqueeze(0) <= rows
    return PrefillChunk(start, end, context_len, blocks, mask)
