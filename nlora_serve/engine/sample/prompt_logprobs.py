"""Prompt log-probabilities: the model's log-probability of each prompt token given the ones before
it (vLLM's ``prompt_logprobs``, what ``echo`` with ``logprobs`` returns, what lm-evaluation-harness
sums to score a continuation).

A step computes logits only at the last token of each sequence that samples. A request with
``SamplingParams.prompt_logprobs`` set also needs the logits at every prompt position but the last
(position p scores prompt token p + 1; the last position's logits are its sampling row, which
scores the first generated token): :func:`plan` lists those packed tokens, the step appends them to
its logits indices after the sampling rows (engine/runner/step_inputs.py), and :func:`score` turns their
logits into the scored token's log-probability and the top-k, packed with the step's read-back
(engine/sample/step_output.py). Only such requests pay: every other sequence in the step still has its
last position computed only.

A step may score up to its whole token budget, and [P, V] float32 logits (with log_softmax's
temporaries, about three times that) would be its largest allocation by far: 4 GiB of logits at
llama-3-8b's 128,256-token vocabulary and an 8,192-token budget. So :func:`score` runs the lm_head
and the scoring over at most :func:`chunk_rows` rows at a time (``SCORE_CHUNK_BYTES_*`` of logits),
whatever the budget: each row's values do not depend on the rows beside it. (vLLM's GPU runner,
``_get_prompt_logprobs_dict``, takes the lm_head of each request's rows of the step at once.)

Each prompt position is scored once, when its chunk is computed (``Sequence.num_prompt_scored``
counts them on the host at launch): a prompt split across steps (chunked prefill) is scored chunk
by chunk, and a preempted sequence that recomputes its prompt does not score it again. A request
that asks for them never starts from cached prefix blocks (the cached tokens' logits were never
computed; vLLM's rule too: prefix_cache.py's ``match``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlora_serve.engine.model.batch_info import ints
from nlora_serve.engine.runner.device_values import host_to_device
from nlora_serve.engine.scheduling.sequence import Sequence


@dataclass(slots=True)
class PromptLogprob:
    """One scored prompt position (vLLM's ``Logprob`` of a prompt token, with its top-k)."""

    logprobs: dict[int, float]  # {token id: log-probability}: the prompt token's first, then its top-k
    rank: int  # the prompt token's rank in the vocabulary: the tokens at least as likely (1 = the most likely)


@dataclass(slots=True)
class PromptRows:
    """The prompt positions one step scores, in logits-row order after the sampling rows."""

    indices: torch.Tensor  # [P] int64 host: packed token index whose logits score the next prompt token
    targets: torch.Tensor  # [P] int64 host: the prompt token each row scores (the one at position + 1)
    spans: list[tuple[Sequence, int]]  # (sequence, rows) in row order; a sequence's rows are consecutive
    top_k: int  # K: the most top log-probabilities one of them asked for

    @property
    def num_rows(self) -> int:
        return int(self.indices.numel())


def plan(pairs: list[tuple[Sequence, int]]) -> PromptRows | None:
    """The rows to score in a step of ``(sequence, new tokens)`` pairs, in the step's packed order,
    before the step's ``num_computed_tokens`` advance; None when no sequence needs any (the common
    step, which then runs as it always did: CUDA graphs included)."""
    indices, targets, spans, start, top_k = [], [], [], 0, 0
    for seq, n in pairs:
        want = seq.params.prompt_logprobs
        if want is not None:
            lo = max(seq.num_computed_tokens, seq.num_prompt_scored)
            hi = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
            if hi > lo:
                first = start + lo - seq.num_computed_tokens
                indices.append(torch.arange(first, first + hi - lo))
                targets.append(ints(seq.token_ids[lo + 1:hi + 1]))
                spans.append((seq, hi - lo))
                top_k = max(top_k, want)
        start += n
    if not spans:
        return None
    return PromptRows(torch.cat(indices), torch.cat(targets), spans, top_k)


def mark_scored(rows: PromptRows) -> None:
    """Advance each scored sequence's ``num_prompt_scored`` past this step's rows (at launch)."""
    for seq, n in rows.spans:
        seq.num_prompt_scored = max(seq.num_prompt_scored, seq.num_computed_tokens) + n


# Float32 logits bytes one chunk of scored rows may hold. On the CPU, below glibc's largest mmap
# threshold (32 MiB, engine/host_memory.py), so every chunk's logits and temporaries come from the
# heap, the same pages chunk after chunk (a 2,000-token echo on the default model: 86k minor page
# faults against 408k unchunked, and no more CPU time). On a GPU, enough rows that the lm_head GEMM
# stays compute-bound (512 at llama-3-8b's 128,256-token vocabulary; in bf16 a GEMM of M rows does
# about M flops per weight byte, and an H100 needs some 300 to be busy).
SCORE_CHUNK_BYTES_CPU = 32 << 20
SCORE_CHUNK_BYTES_GPU = 256 << 20
_ROW_MULTIPLE = 64  # chunks of whole GEMM row tiles, so that no chunk's lm_head runs a mostly empty tile


def chunk_rows(vocab_size: int, device_type: str) -> int:
    """Rows per scoring chunk on a ``device_type`` ("cpu", "cuda") device: as many as its
    ``SCORE_CHUNK_BYTES_*`` of float32 logits strictly hold, rounded down to a multiple of 64 when
    there are more than 64 (at least 1)."""
    limit = SCORE_CHUNK_BYTES_CPU if device_type == "cpu" else SCORE_CHUNK_BYTES_GPU
    rows = max(1, (limit - 1) // (4 * vocab_size))
    return rows - rows % _ROW_MULTIPLE if rows > _ROW_MULTIPLE else rows


def score(logits_of: Callable[[torch.Tensor], torch.Tensor], indices: torch.Tensor, rows: PromptRows,
          chunk: int) -> list[torch.Tensor]:
    """The read-back parts of the scored rows, float64 on ``indices``' device: ``[P]`` the scored
    tokens' log-probabilities, ``[P]`` their ranks (the tokens at least as likely, itself included:
    vLLM 0.32's ``batched_count_greater_than``, ``x >= value``, so tied tokens share the lowest rank), then
    ``[P * K]`` top values and ``[P * K]`` their token ids (row by row, best first).

    ``logits_of(idx)``: [n, V] float32 logits of the step's packed tokens ``idx`` [n] int64, the
    model's raw distribution (no bias, penalty or temperature: vLLM's prompt logprobs are of the
    raw model too); called on ``indices`` [P] (the rows' packed tokens, on the device) ``chunk``
    rows at a time, so no tensor here holds more than ``chunk`` rows of V. Each chunk's logits are
    turned into log-probabilities in place.
    """
    targets = host_to_device(rows.targets, indices.device)  # pinned: no host wait behind the forward
    k = rows.top_k
    scored, ranks, top_v, top_i = [], [], [], []
    for lo in range(0, rows.num_rows, chunk):
        logits = logits_of(indices[lo:lo + chunk])
        logp = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))
        value = logp.gather(1, targets[lo:lo + chunk].unsqueeze(1))
        scored.append(value.view(-1))
        ranks.append((logp >= value).sum(dim=1))
        if k:
            v, i = logp.topk(k, dim=-1)
            top_v.append(v.reshape(-1))
            top_i.append(i.reshape(-1))
    return [torch.cat(part).double() for part in (scored, ranks, top_v, top_i) if part]


def unpack(values: list[float], rows: PromptRows) -> list[tuple[Sequence, list[PromptLogprob]]]:
    """:func:`score`'s parts read back (``values``, host floats) -> per sequence its scored positions:
    ``{token: logprob}`` (the scored prompt token first, then its top ``prompt_logprobs``) and rank."""
    p, k = rows.num_rows, rows.top_k
    scored, ranks = values[:p], values[p:2 * p]
    top_v, top_i = values[2 * p:2 * p + p * k], values[2 * p + p * k:2 * p + 2 * p * k]
    targets = rows.targets.tolist()
    out, at = [], 0
    for seq, n in rows.spans:
        want = seq.params.prompt_logprobs
        entries = []
        for r in range(at, at + n):
            entry = {targets[r]: scored[r]}
            for i, v in zip(top_i[r * k:r * k + want], top_v[r * k:r * k + want]):
                entry.setdefault(int(i), v)
            entries.append(PromptLogprob(entry, int(ranks[r])))
        out.append((seq, entries))
        at += n
    return out
