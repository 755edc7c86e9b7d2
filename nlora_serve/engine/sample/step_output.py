"""A step's sampled tokens on the device, and their one read-back to the host.

Sampling ends a step on the device: the token ids, whether each row's logits were finite and the
requested log-probabilities are packed into one float64 tensor (token ids and float32 values are
exact in float64) and copied to the host in one ``copy_(non_blocking=True)`` into pinned memory,
followed by an event. The host waits on that event only when it needs the values (after it has
launched the next step, with async scheduling), so one step costs one device sync, never more.
The token ids also stay on the device (:attr:`SampledStep.tokens`), where the next step's input ids
gather them without a host round trip (engine/runner/step_inputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob, PromptRows, unpack
from nlora_serve.engine.sample.sampling import add_logit_bias, apply_penalties, ban_before_min_tokens, sample
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.structured_output.structured import mask_rows
from nlora_serve.engine.sample.token_masks import ban_bad_words, keep_allowed
from nlora_serve.engine.runner.device_values import to_device


@dataclass(slots=True)
class SampledStep:
    """One launched step: what it computed and its sampled tokens, maybe still on the device."""

    # (sequence, tokens computed) as launched. Not read, but holding them keeps every sequence of
    # the step alive while it is in flight, so no new sequence reuses an id() that keys ``computed``
    # or ``rows`` (a request added and aborted before the next step looks its id up in ``computed``)
    pairs: list[tuple[Sequence, int]]
    seqs: list[Sequence]  # the sampling sequences, one row each, in row order
    tokens: torch.Tensor  # [R] int64 on the device: the sampled ids, gathered by the next step
    # [2R + W(1 + 2K) + I + P(2 + 2K')] float64 on the host (pinned on CUDA): see sample_step
    packed: torch.Tensor
    event: torch.cuda.Event | None  # recorded after the copy into ``packed``; None on the CPU
    logprob_rows: list[int]  # rows that asked for log-probabilities (W of them)
    top_k: int  # K: the most log-probabilities one of them asked for
    computed: dict[int, int]  # id(sequence) -> tokens it computed in this step
    rows: dict[int, int]  # id(sequence) -> its row in ``tokens``
    needs_values: bool  # a sampling sequence's next sampling reads its token values (penalties)
    prompt: PromptRows | None = None  # the prompt positions this step scored (P rows), None: none
    num_picked: int = 0  # I: the logprob_token_ids of the W rows together (their values follow the top-k)

    def row_of(self, seq: Sequence) -> int:
        """``seq``'s row in :attr:`tokens`, or -1 when it did not sample in this step."""
        return self.rows.get(id(seq), -1)

    def read(self) -> tuple[list[int], list[bool], list[list[dict[int, float]] | None]]:
        """Wait for the copy; per row: the token id, whether its logits were finite, and its
        log-probabilities (``[{token: logprob}]``, the sampled token's first, then its top-k or its
        ``logprob_token_ids`` in their order, or None)."""
        if self.event is not None:
            self.event.synchronize()
        values = self.packed.tolist()
        r, w, k = len(self.seqs), len(self.logprob_rows), self.top_k
        tokens = [int(t) for t in values[:r]]
        finite = [v != 0.0 for v in values[r:2 * r]]
        logprobs: list = [None] * r
        at = 2 * r + w  # after the tokens, the finite flags and the sampled tokens' log-probabilities
        sampled_lp, top_v, top_i = values[2 * r:at], values[at:at + w * k], values[at + w * k:at + 2 * w * k]
        picked = at + 2 * w * k  # the rows' logprob_token_ids values, in row order
        for j, row in enumerate(self.logprob_rows):
            params = self.seqs[row].params
            entry = {tokens[row]: sampled_lp[j]}
            if params.logprob_token_ids is not None:  # a dict keeps the sampled token first, as vLLM's
                n = len(params.logprob_token_ids)
                entry.update(zip(params.logprob_token_ids, values[picked:picked + n]))
                picked += n
            else:
                want = params.logprobs
                entry.update(zip((int(i) for i in top_i[j * k:j * k + want]), top_v[j * k:j * k + want]))
            logprobs[row] = [entry]
        return tokens, finite, logprobs

    def read_prompt(self) -> list[tuple[Sequence, list[PromptLogprob]]]:
        """Wait for the copy; the prompt positions this step scored, per sequence in row order
        (engine/sample/prompt_logprobs.py); [] when none."""
        if self.prompt is None:
            return []
        if self.event is not None:
            self.event.synchronize()
        w, k = len(self.logprob_rows), self.top_k
        return unpack(self.packed[2 * len(self.seqs) + w * (1 + 2 * k) + self.num_picked:].tolist(), self.prompt)


def sample_step(logits: torch.Tensor, pairs: list[tuple[Sequence, int]], seqs: list[Sequence],
                bans: list[frozenset[int]], shared: torch.Generator, prompt: PromptRows | None = None,
                scored: list[torch.Tensor] = ()) -> SampledStep:
    """Sample ``seqs``' rows of ``logits`` on its device and start their read-back (no host wait).

    Args:
        logits: [R, V] float32, one row per sampling sequence (masks, logit_bias and penalties are
            applied in place).
        pairs: the step's (sequence, tokens computed). seqs: the R sampling sequences.
        bans: per row, the tokens banned until min_tokens (EOS and stop ids).
        shared: the engine's generator, for rows without their own seed.
        prompt, scored: the P prompt positions the step scored and their read-back parts
            (engine/sample/prompt_logprobs.py's ``score``), read in the same copy: :meth:`SampledStep.read_prompt`.
    Log-probabilities are those of the model's distribution (before logit_bias, penalties and temperature):
    ``log_softmax`` of the raw row, the sampled token's and the top ``logprobs`` ones, or those of its
    ``logprob_token_ids`` (vLLM's sampler gathers them from the same raw log-probabilities); a row with a
    grammar (``seq.matcher``) is masked first, so its distribution is the masked one (vLLM's order).
    """
    # a row's sum is finite iff all its logits are (NaN and ±inf propagate; |logits| that could
    # overflow a float32 sum are no model's output): one pass, where isfinite().all() took 32 ms
    # for 64 rows of 49,152 on one CPU thread
    finite = logits.sum(dim=1).isfinite()  # before grammar masks set -inf
    constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if constrained:
        mask_rows(logits, constrained, [seqs[i].matcher for i in constrained])
    wanted = [i for i, s in enumerate(seqs) if s.params.wants_logprobs]
    k = max((seqs[i].params.logprobs for i in wanted if seqs[i].params.logprob_token_ids is None), default=0)
    picked = [(j, seqs[i].params.logprob_token_ids) for j, i in enumerate(wanted)
              if seqs[i].params.logprob_token_ids is not None]
    # the rows as a device index: a list (a CPU index) is copied to the device blocking, a stream sync
    wanted_rows = to_device(wanted, logits.device, torch.long) if wanted else None
    logp = logits[wanted_rows].log_softmax(dim=-1) if wanted else None  # before penalties change the rows
    allowed = [i for i, s in enumerate(seqs) if s.allowed_ids is not None]
    if allowed:  # vLLM's masks: after the logprobs, before logit_bias and the penalties
        keep_allowed(logits, allowed, [seqs[i].allowed_ids for i in allowed])
    for i, seq in enumerate(seqs):
        if seq.bad_words_ids:
            ban_bad_words(logits[i], seq.bad_words_ids, seq.token_ids[seq.num_prompt_tokens:])
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    add_logit_bias(logits, biased, [seqs[i].params.logit_bias for i in biased])  # before penalties, as vLLM
    # a grammar's next mask needs the token: its step is read back before the next one is launched
    # a multi-token bad word compares the output's last tokens: read back before the next step too
    banned = []
    needs_values = bool(constrained) or any(len(w) > 1 for s in seqs for w in s.bad_words_ids)
    for i, seq in enumerate(seqs):
        params = seq.params
        if params.min_tokens and seq.num_output_tokens < params.min_tokens and bans[i]:
            banned.append(i)
        if params.reads_token_values:
            needs_values = True
            apply_penalties(logits[i], seq.token_ids, seq.num_prompt_tokens, params, set())
    ban_before_min_tokens(logits, banned, [bans[i] for i in banned])  # all rows in one write
    tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], shared)
    parts = [tokens.double(), finite.double()]
    if wanted:
        parts.append(logp.gather(1, tokens[wanted_rows].unsqueeze(1)).view(-1).double())
        if k:
            top_v, top_i = logp.topk(k, dim=-1)
            parts += [top_v.reshape(-1).double(), top_i.reshape(-1).double()]
        if picked:
            rows = to_device([j for j, ids in picked for _ in ids], logp.device, torch.long)
            cols = to_device([t for _, ids in picked for t in ids], logp.device, torch.long)
            parts.append(logp[rows, cols].double())
    packed = torch.cat(parts + list(scored))
    event = None
    if packed.device.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        packed = host
    return SampledStep(pairs, seqs, tokens, packed, event, wanted, k, {id(s): n for s, n in pairs},
                       {id(s): i for i, s in enumerate(seqs)}, needs_values, prompt,
                       sum(len(ids) for _, ids in picked))
