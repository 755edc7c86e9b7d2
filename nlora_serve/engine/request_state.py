"""What the engine core keeps for each open request beside its :class:`Sequence`, and the
:class:`RequestOutput` deltas it makes from it (vLLM's ``RequestState`` in its output processor)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.detokenizer import IncrementalDetokenizer
from nlora_serve.engine.runner.device_values import to_device
from nlora_serve.engine.eos import EosTokens
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.structured_output.grammar_compiler import GrammarCompiler
from nlora_serve.engine.structured_output.structured import allows_a_token
from nlora_serve.engine.sample.token_masks import bad_words_token_ids


@dataclass(slots=True)
class RequestState:
    """One open request, as :class:`~nlora_serve.engine.core.EngineCore` keeps it from add to retire."""

    seq: Sequence  # its tokens, progress and KV blocks, as the scheduler sees them
    detokenizer: IncrementalDetokenizer  # its generated tokens to text deltas; applies stop strings
    # EOS ids (unless ignore_eos) and stop_token_ids: a sampled one ends the request (engine/eos.py)
    stops: frozenset[int]
    # every EOS id and stop_token_ids, ignore_eos or not: banned until min_tokens (vLLM's all_stop_token_ids)
    ban: frozenset[int]
    # with params.prompt_logprobs: [None] (the first token is scored by nothing), then each scored
    # prompt position's {token: logprob} as steps are read back; handed out with the first token
    # (then None), as vLLM's first output carries prompt_logprobs
    prompt_logprobs: list | None = None


def new_request(request_id: str, arrival: int, prompt_ids: list[int], params: SamplingParams, adapter,
                tenant: str | None, cache_salt: str | None, *, device: torch.device, tokenizer, eos: EosTokens,
                grammars: GrammarCompiler) -> RequestState:
    """A request's state at admission, from a checked ``params`` (max_tokens already fitted to the
    context). ``arrival``: its admission order (see :class:`Sequence`); ``adapter``: its pinned
    AdapterVersion or None; ``device``: where its seeded generator and allowed-ids tensor live;
    ``grammars``: where its structured-output spec was compiled (at validation; a cache hit here).
    """
    gen = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    # the grammar compiled in validate: a cache hit here, on the step thread
    spec = params.structured_outputs
    matcher = None if spec is None else grammars.matcher(spec, eos.grammar_stops(params.stop_token_ids))
    allowed = None if params.allowed_token_ids is None else to_device(
        sorted(set(params.allowed_token_ids)), device, torch.long)
    seq = Sequence(request_id, arrival, list(prompt_ids), len(prompt_ids), params, gen, matcher,
                   bad_words_token_ids(tokenizer, params.bad_words), allowed_ids=allowed, adapter=adapter,
                   tenant=tenant, cache_salt=cache_salt)
    detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.stop,
                                   min_tokens=params.min_tokens, include_stop=params.include_stop_str_in_output,
                                   spaces_between_special_tokens=params.spaces_between_special_tokens)
    return RequestState(seq, detok, eos.stops(params.stop_token_ids, params.ignore_eos),
                        eos.banned_before_min_tokens(params.stop_token_ids),
                        [None] if params.prompt_logprobs is not None else None)


def request_output(req: RequestState, text: str, token_ids: list[int], reason: str | None, logprobs,
                   adapter=None) -> RequestOutput:
    """The delta of ``req``: ``text`` and ``token_ids`` new since the last one, ``reason`` its
    finish reason (None while it runs), ``logprobs`` per token (or None). The first delta with a
    token carries the prompt's log-probabilities, once. ``adapter``: the version to report when the
    sequence no longer holds it (a retired request's pin, released before its last delta)."""
    seq = req.seq
    adapter = adapter if adapter is not None else seq.adapter
    prompt_logprobs = None
    if token_ids and req.prompt_logprobs is not None:  # the first token's delta
        prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
    return RequestOutput(seq.request_id, text, token_ids, reason, seq.num_prompt_tokens,
                         seq.num_output_tokens, logprobs, adapter=adapter and adapter.name,
                         adapter_version=adapter.version if adapter else 0,
                         adapter_hash=adapter.content_hash if adapter else "",
                         cached_tokens=max(seq.num_cached_tokens, 0), prompt_logprobs=prompt_logprobs)


def nonfinite_error(seq: Sequence) -> str:
    """Why ``seq`` ends with an error when its logits are not finite (inf or NaN)."""
    on = f"adapter {seq.adapter.name!r} v{seq.adapter.version}" if seq.adapter else "the base model"
    return (f"the model's logits on {on} are not finite (inf or NaN); the adapter's "
            "weights or scaling overflow the compute dtype")


def broken_grammar(seq: Sequence, token: int, vocab_size: int) -> str:
    """Why ``seq``'s matcher refused ``token``, sampled from its masked row."""
    if not allows_a_token(seq.matcher, vocab_size):  # vLLM ends such a request as an error too
        return (f"the structured output allows no token after {seq.num_output_tokens - 1} tokens: its spec has a "
                "dead end here (no text continues it, and the output may not end)")
    if seq.allowed_ids is not None or seq.bad_words_ids:  # the request's masks took the grammar's last tokens
        return (f"allowed_token_ids / bad_words ban every token the structured output allows after "
                f"{seq.num_output_tokens - 1} tokens: the request's masks and its spec contradict each other")
    return f"token {token} breaks the request's structured output"
