"""The sampler's worst case, run on dummy rows without a request (vLLM's ``_dummy_sampler_run``).

Two users. The KV budget (engine/runner/memory.py) runs it on ``max_num_seqs`` rows of real lm_head
logits while it measures the step's peak, so the memory the sampler takes is not handed to the KV
cache (at 256 rows of a 128k vocabulary its [R, V] float32 temporaries come to about 1 GiB). The
warm-up (engine/runner/warmup.py) runs it once more at the end, as vLLM does after its graph captures: the
sampled path's kernels (sort, cumsum, log_softmax, topk, bincount, scatter, the grammar bitmask's
Triton kernel) are then compiled, and the caching allocator holds blocks of the largest shapes,
before the first sampled batch arrives.

Every row of the worst case samples (temperature 1) with min-p, top-k and top-p, asks for
MAX_LOGPROBS log-probabilities, has repetition, presence and frequency penalties over one output
token and a logit bias; with ``grammar_mask`` a structured-output bitmask is applied to every row
(all tokens allowed, so the draw is unchanged).
"""

from __future__ import annotations

import torch

from nlora_serve.engine.sample.sampling import MAX_LOGPROBS, SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.sample.step_output import SampledStep, sample_step
from nlora_serve.engine.structured_output.structured import mask_rows

# every per-row option the sampler has that allocates [R, V] temporaries or launches its own kernels
WORST_CASE = SamplingParams(max_tokens=2, temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, logprobs=MAX_LOGPROBS,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5,
                            logit_bias=((0, 1.0),))


def dummy_sampler_run(logits: torch.Tensor, shared: torch.Generator, grammar_mask: bool = False) -> SampledStep:
    """Sample every row of ``logits`` with :data:`WORST_CASE` (changed in place, as a step's are)
    and wait for the read-back.

    Args:
        logits: [R, V] float32 on the device (R > 0): the rows to sample, e.g. ``max_num_seqs`` rows.
        shared: the generator the rows draw from (on ``logits``' device).
        grammar_mask: also apply an all-allowing structured-output bitmask to every row (imports
            xgrammar: several seconds on a cold CPU process, hence off unless asked).
    Returns:
        The read :class:`SampledStep` (R rows, top-k MAX_LOGPROBS), for the caller's checks.
    Raises:
        ValueError: ``logits`` is not a non-empty 2-D float32 tensor.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.dtype != torch.float32:
        raise ValueError(f"dummy_sampler_run needs [R > 0, V] float32 logits; got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    rows, vocab = logits.shape
    # a 2-token prompt and one output token per row: the penalties have a prompt and an output to read
    seqs = [Sequence(f"__dummy-sampler-{i}", i, [i % vocab, (i + 1) % vocab, (i + 2) % vocab], 2, WORST_CASE)
            for i in range(rows)]
    if grammar_mask:
        mask_rows(logits, list(range(rows)), [None] * rows)
    step = sample_step(logits, [(s, 1) for s in seqs], seqs, [set()] * rows, shared)
    step.read()
    return step
