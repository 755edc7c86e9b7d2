"""Prompt log-probabilities: the model's log-probability of each prompt token given the ones before
it (vLLM's ``prompt_logprobs``, what ``echo`` with ``logprobs`` returns, what lm-evaluation-harness
sums to score a continuation).

A step computes logits only at the last token of each sequence that samples. A request with
``SamplingParams.prompt_logprobs`` set also needs the logits at every prompt position but the last
(position p scores prompt token p + 1; the last position's logits are its sampling row, which
scores the first generated token): :func:`plan` lists those packed tokens, the step appends them to
its logits indices after the sampling rows (engine/step_inputs.py), and :func:`score` turns their
logits into the scored token's log-probability and the top-k, packed with the step's read-back
(engine/step_output.py). Only such requests pay: every other sequence in the step still has its
last position computed only.

Each prompt position is scored once, when its chunk is computed (``Sequence.num_prompt_scored``
counts them on the host at launch): a prompt split across steps (chunked prefill) is scored chunk
by chunk, and a preempted sequence that recomputes its prompt does not score it again. A request
that asks for them never starts from cached prefix blocks (the cached tokens' logits were never
computed; vLLM's rule too: prefix_cache.py's ``match``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.engine.batch_info import ints
from nlora_serve.engine.sequence import Sequence


@dataclass(slots=True)
class PromptLogprob:
    """One scored prompt position (vLLM's ``Logprob`` of a prompt token, with its top-k)."""

    logprobs: dict[int, float]  # {token id: log-probability}: the prompt token's first, then its top-k
    rank: int  # the prompt token's rank in the vocabulary (1 = the most likely)


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


def score(logits: torch.Tensor, rows: PromptRows) -> list[torch.Tensor]:
    """The read-back parts of the scored rows, float64 on ``logits``' device: ``[P]`` the scored
    tokens' log-probabilities, ``[P]`` their ranks (1 + the tokens strictly more likely), then
    ``[P * K]`` top values and ``[P * K]`` their token ids (row by row, best first).

    ``logits`` [P, V] float32, the model's raw distribution (no bias, penalty or temperature:
    vLLM's prompt logprobs are of the raw model too), turned into log-probabilities in place: a
    step's P can reach its token budget, and [P, V] is the largest tensor of such a step.
    """
    logp = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))
    targets = rows.targets.to(logits.device, non_blocking=True)
    scored = logp.gather(1, targets.unsqueeze(1))
    parts = [scored.view(-1).double(), ((logp > scored).sum(dim=1) + 1).double()]
    if rows.top_k:
        top_v, top_i = logp.topk(rows.top_k, dim=-1)
        parts += [top_v.reshape(-1).double(), top_i.reshape(-1).double()]
    return parts


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
