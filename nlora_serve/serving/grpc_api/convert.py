"""Proto messages <-> engine types for the gRPC front end (no I/O, no grpc calls).

Every function that reads a client's message raises :class:`RequestError` with a message naming
the offending field, which the server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

from nlora_serve import __version__
from nlora_serve.adapters.runtime.version import AdapterVersion
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.chat_template import render_chat
from nlora_serve.serving.request_policy import check_cache_salt, check_min_tokens_unset_max, max_tokens_of
from nlora_serve.engine.sample.sampling import MAX_LOGPROBS, RequestError, SamplingParams
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.serving.server_config import ServerConfig, default_served_name

MAX_REQUEST_ID = 256  # characters of a client's request_id: an id, echoed in every response, not a payload
# SamplingParams.top_k is uint32, which cannot carry vLLM's -1 ("off"): a client's -1 arrives as
# 2^32 - 1 (cast to uint32, or an int32 field's sign-extended varint read as uint32), taken as off
TOP_K_MINUS_ONE = (1 << 32) - 1
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def request_id_of(msg: pb.GenerateRequest) -> str:
    """The client's ``request_id`` ('' when unset), which every response echoes.

    Raises:
        RequestError: longer than :data:`MAX_REQUEST_ID` characters (a 1 MB id was echoed into
            each streamed message before).
    """
    if len(msg.request_id) > MAX_REQUEST_ID:
        raise RequestError(f"GenerateRequest.request_id must be at most {MAX_REQUEST_ID} characters; "
                           f"got {len(msg.request_id)}")
    return msg.request_id


def cache_salt(msg: pb.GenerateRequest) -> str:
    """The client's ``cache_salt`` ('' when unset: the unsalted group).

    Raises:
        RequestError: longer than :data:`~nlora_serve.serving.request_policy.MAX_CACHE_SALT` characters.
    """
    check_cache_salt(msg.cache_salt, "GenerateRequest.cache_salt")
    return msg.cache_salt


def sampling_params(msg: pb.SamplingParams, config: ServerConfig) -> SamplingParams:
    """The engine's SamplingParams for a request's ``sampling`` message.

    A field left unset takes the server's default (``config.sampling_defaults``: the model's
    generation_config.json, ``--override-generation-config``), else this API's: temperature greedy,
    top_p 1, top_k every token, repetition_penalty 1. presence_penalty and frequency_penalty have
    no unset state in the proto: 0 takes the default. The proto has no min_p: the default's applies.
    max_tokens 0 (unset) is the rest of the context, at most ``config.max_tokens`` (see
    :func:`~nlora_serve.serving.request_policy.max_tokens_of`); top_k 0 or 2^32 - 1 (-1 as
    uint32) keeps every token.

    Raises:
        RequestError: a field out of range (top_logprobs or prompt_logprobs over
            :data:`~nlora_serve.engine.sample.sampling.MAX_LOGPROBS`; a max_tokens over ``config.max_tokens``
            is lowered to it, never refused), a malformed structured_outputs (:func:`structured_of`),
            or with max_tokens unset min_tokens over the unset max_tokens' limit.
    """
    max_tokens = max_tokens_of(msg.max_tokens, config)
    if not msg.max_tokens:
        check_min_tokens_unset_max(msg.min_tokens, config, "SamplingParams.min_tokens")
    for name in ("top_logprobs", "prompt_logprobs"):
        if getattr(msg, name) > MAX_LOGPROBS:
            raise RequestError(f"SamplingParams.{name} must be at most {MAX_LOGPROBS}; got {getattr(msg, name)}")
    default = config.sampling_defaults.value

    def sent(name: str):
        return getattr(msg, name) if msg.HasField(name) else None

    top_k = sent("top_k")
    return SamplingParams(
        max_tokens=max_tokens, min_tokens=msg.min_tokens,
        temperature=default("temperature", sent("temperature"), 0.0),
        top_p=default("top_p", sent("top_p"), 1.0),
        top_k=default("top_k", 0 if top_k == TOP_K_MINUS_ONE else top_k, 0),
        min_p=default("min_p", None, 0.0),
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        presence_penalty=default("presence_penalty", msg.presence_penalty or None, 0.0),
        frequency_penalty=default("frequency_penalty", msg.frequency_penalty or None, 0.0),
        repetition_penalty=default("repetition_penalty", sent("repetition_penalty"), 1.0),
        logprobs=msg.top_logprobs or None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        allowed_token_ids=tuple(msg.allowed_token_ids) or None, bad_words=tuple(msg.bad_words),
        structured_outputs=structured_of(msg))


def structured_of(msg: pb.SamplingParams) -> StructuredOutputs | None:
    """The request's ``structured_outputs`` (None: unset, free text); whether it compiles is the
    engine's check (:meth:`~nlora_serve.engine.api.Engine.check_structured`).

    Raises:
        RequestError: set without a constraint, json_object false, an empty choice list.
    """
    if not msg.HasField("structured_outputs"):
        return None
    spec, field = msg.structured_outputs, "SamplingParams.structured_outputs"
    kind = spec.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not spec.json_object):
        raise RequestError(f"{field} needs a constraint: json_schema, json_object (true), regex, choice or grammar")
    return StructuredOutputs(json=spec.json_schema if kind == "json_schema" else None,
                             json_object=kind == "json_object", regex=spec.regex if kind == "regex" else None,
                             choice=tuple(spec.choice.choices) if kind == "choice" else None,
                             grammar=spec.grammar if kind == "grammar" else None,
                             disable_any_whitespace=spec.disable_any_whitespace, param=field)


def prompt_of(request: pb.GenerateRequest, tokenizer, chat_bounds: tuple[int | None, int | None] = (None, None)
              ) -> str | list[int]:
    """The engine prompt: raw text, token ids, or chat messages rendered with the chat template.

    Raises:
        RequestError: no prompt, an empty one, a chat message with an unknown role, chat contents
            or messages over ``chat_bounds`` (max_bytes, max_messages of
            :func:`~nlora_serve.serving.chat_template.render_chat`).
    """
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text:
            raise RequestError("GenerateRequest.text is empty: need at least one token")
        return request.text
    if kind == "token_ids":
        return list(request.token_ids.ids)
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return render_chat(messages, tokenizer, "GenerateRequest.chat.messages", *chat_bounds)
    raise RequestError("GenerateRequest.prompt is not set: give text, token_ids or chat")


def add_special_tokens(request: pb.GenerateRequest) -> bool:
    """Whether a text prompt takes the tokenizer's special tokens: ``add_special_tokens``, unset
    true (vLLM's default for a completion); token ids and chats are never changed by it.

    Raises:
        RequestError: true with a chat prompt (its template writes the special tokens; vLLM's chat
            requests default to false too).
    """
    if request.WhichOneof("prompt") == "chat" and request.add_special_tokens:
        raise RequestError("GenerateRequest.add_special_tokens=true is not supported with chat: the chat "
                           "template writes the model's special tokens itself (a second BOS would follow)")
    return request.add_special_tokens if request.HasField("add_special_tokens") else True


def adapter_ref(version: AdapterVersion | None) -> pb.AdapterRef:
    """The AdapterRef of a version (empty name, version 0 for the base model)."""
    if version is None:
        return pb.AdapterRef()
    return pb.AdapterRef(name=version.name, version=version.version, content_hash=version.content_hash)


def response(out: RequestOutput, scored: tuple[list[int], int] | None = None) -> pb.GenerateResponse:
    """One streamed delta, carrying the adapter version pinned at admission (the same in every delta).

    ``scored``: (the prompt's token ids, its ``prompt_logprobs``) of a request that scores its
    prompt; the delta that carries the prompt's log-probabilities gets them, with that many most
    likely tokens each."""
    msg = pb.GenerateResponse(text=out.text, token_ids=out.token_ids, request_id=out.request_id)
    msg.adapter.name, msg.adapter.version = out.adapter or "", out.adapter_version
    msg.adapter.content_hash = out.adapter_hash
    if out.finish_reason is not None:
        msg.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_ABORT)
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.usage.cached_tokens = out.cached_tokens
    for token, lps in zip(out.token_ids, out.logprobs or []):
        top = sorted(lps.items(), key=lambda kv: -kv[1])  # the top-k (and the sampled token), best first
        msg.logprobs.add(token_id=token, logprob=lps.get(token, 0.0),
                         top_token_ids=[t for t, _ in top], top_logprobs=[lp for _, lp in top])
    if out.prompt_logprobs and scored is not None:
        # the first prompt token has no context (None); each entry holds the prompt token's own
        # log-probability and the top k, which may include it
        prompt, k = scored
        for token, entry in zip(prompt[1:], out.prompt_logprobs[1:]):
            top = sorted(entry.logprobs.items(), key=lambda kv: -kv[1])[:k]
            msg.prompt_logprobs.add(token_id=token, logprob=entry.logprobs[token], rank=entry.rank,
                                    top_token_ids=[t for t, _ in top], top_logprobs=[lp for _, lp in top])
    return msg


def adapter_info(version: AdapterVersion, resident: bool, active_requests: int | None = None) -> pb.AdapterInfo:
    """What the admin and list RPCs report about one version; ``resident``: Engine.is_resident;
    ``active_requests``: the requests to report (None: every tenant's, for an admin)."""
    return pb.AdapterInfo(ref=adapter_ref(version), flavour=version.flavour, rank=version.rank,
                          target_modules=list(version.targets), tied=version.is_tied,
                          resident_bytes=version.held_bytes if resident else 0,
                          active_requests=version.refcount if active_requests is None else active_requests)


def server_info(base, engine_config, config: ServerConfig, backend: str = "native") -> pb.ServerInfo:
    """GetServerInfo's answer for a :class:`BaseModel` served with an :class:`EngineConfig` on
    ``backend`` ("native" or "vllm")."""
    model = config.served_model_name or default_served_name(base.path)
    return pb.ServerInfo(server_version=__version__, model=model, model_fingerprint=base.fingerprint,
                         dtype=str(base.dtype).removeprefix("torch."), backend=backend,
                         max_rank=engine_config.adapter_limits.max_rank, max_adapter_bytes=config.max_adapter_bytes,
                         max_model_len=engine_config.scheduler.max_model_len)
