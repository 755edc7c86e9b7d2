"""One request's state inside the engine: its tokens, progress, KV blocks and sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from nlora_serve.engine.sample.sampling import SamplingParams

PLACEHOLDER = -1  # a token id sampled by a step in flight, not yet read back (never a real id)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute; holds no KV blocks
    RUNNING = "running"  # holds KV blocks and gets tokens scheduled every step
    FINISHED = "finished"  # done; its blocks were freed exactly once


@dataclass(slots=True, eq=False)
class Sequence:
    """A request's tokens and progress. Identity (``is``) is equality: ``eq=False``."""

    # unique among the engine's open requests (LLMEngine passes its own engine id from
    # api.RequestIds, not the client's)
    request_id: str
    arrival: int  # admission order, unique and increasing: FCFS and preemption order key
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int  # the prompt's length: token_ids[:num_prompt_tokens] is the prompt
    params: SamplingParams  # how to sample and when to stop (max_tokens, stop, min_tokens, ...)
    generator: torch.Generator | None = None  # per-request generator when params.seed is set
    # its xgrammar GrammarMatcher when params.structured_outputs is set (engine/structured_output/structured.py): masks
    # its row before sampling, accepts each token read back
    matcher: object | None = None
    # params.bad_words as token sequences (engine/sample/token_masks.py), tokenized once at admission
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # params.allowed_token_ids, distinct and sorted, as an int64 tensor on the engine's device (made
    # once at admission: a step's mask then costs no host-side list per row); None = every token
    allowed_ids: torch.Tensor | None = None
    status: SequenceStatus = SequenceStatus.WAITING  # where it is: waiting, running, finished
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # KV blocks, see BlockManager
    num_preemptions: int = 0  # times this sequence lost its blocks and recomputed
    adapter: object | None = None  # pinned AdapterVersion (None = base model), released at the end
    tenant: str | None = None  # who sent it (fair scheduling, VTC); None = the anonymous tenant
    # prefix-cache sharing group: blocks are shared only between requests with equal salts (with
    # keys, the front ends make it (tenant, requested salt): request_policy.cache_salt_of; None = unsalted)
    cache_salt: str | None = None
    # prefix_cache.root_key of this sequence, computed once (its adapter and salt never change):
    # re-hashing the salt each time a block fills made long salts cost every tenant engine time
    prefix_key: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of its full blocks so far
    num_hashed_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not yet)
    # prompt positions whose logits a launched step scored (engine/sample/prompt_logprobs.py; with
    # params.prompt_logprobs only): never scored twice, also when a preempted sequence recomputes
    num_prompt_scored: int = 0
    num_charged_tokens: int = 0  # tokens billed to its tenant's fairness counter (never billed twice)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before this sequence can sample again."""
        return len(self.token_ids) - self.num_computed_tokens
