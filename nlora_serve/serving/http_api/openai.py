"""OpenAI API requests -> engine inputs, for the HTTP front end (no I/O).

Requests are pydantic models of the fields we implement
(:mod:`~nlora_serve.serving.http_api.request_models`). Every other field is refused with a 400
that names it (:class:`ParamError`), never silently ignored, also when it is null; a few OpenAI
fields are accepted at their no-op value or null only (``NOOP_VALUES``: chat's ``echo=false``, ...).
``n`` choices are n engine requests, choice i seeded ``seed + i`` (vLLM 0.32's rule; see
:mod:`~nlora_serve.serving.http_api.choices`); n > 1 with greedy sampling is refused as vLLM refuses
it, ``best_of`` is accepted only null or equal to n (vLLM 0.32 drops the field). Chat messages take
the ``developer`` role and a ``name``, both given to the chat template as they are (vLLM's way);
``top_logprobs: 0`` without ``logprobs`` asks nothing. Chat's ``tools`` and ``tool_choice`` are served
as vLLM 0.32 serves them (:mod:`~nlora_serve.serving.http_api.tools`: named and "required" forced
by a JSON schema, "auto" refused in vLLM's words); the legacy ``functions`` is refused at every value.
``chat_template_kwargs``, ``documents`` and ``reasoning_effort`` are template variables
(:func:`~nlora_serve.serving.chat_template.template_kwargs`); ``allowed_token_ids`` and ``bad_words``
vLLM's token masks (:mod:`~nlora_serve.engine.sample.token_masks`). ``IGNORED`` fields change nothing
in vLLM on these endpoints and are accepted at any value. ``user`` (an end-user id for abuse
tracking) is accepted and changes nothing, as at OpenAI; so are ``OPENAI_IGNORED``'s fields (``store``,
``metadata``, ``service_tier``, prompt-cache hints, ``prediction``, ...) at any value, and ``modalities``
``["text"]`` (``audio`` null only), as vLLM 0.32 accepts them.

``response_format`` (text, json_object, json_schema) and vLLM's ``structured_outputs`` constrain the
output (:mod:`~nlora_serve.serving.http_api.structured`).

``logit_bias`` keys are token ids as decimal strings (OpenAI's form). An unset sampling field takes
the server's default (the model's generation_config.json under ``--generation-config auto``, and
``--override-generation-config``: :mod:`~nlora_serve.serving.generation_config`), else the OpenAI
API's: ``temperature`` 1, ``top_p`` 1; chat's ``max_tokens`` unset is the rest of
the context (max_model_len - prompt tokens, as vLLM; at most ``--max-tokens`` and the generation
config's max_new_tokens: see :func:`~nlora_serve.serving.stream.start_request`), completions' 16 (vLLM
0.32's and OpenAI's default: :func:`~nlora_serve.serving.request_policy.completion_unset_max_tokens`). Extensions, under vLLM's
names (send them in ``extra_body``): ``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``spaces_between_special_tokens`` (false: adjacent added tokens written without a space between them,
:mod:`~nlora_serve.engine.detokenizer`), ``return_tokens_as_token_ids`` (logprob tokens as
``"token_id:<id>"``), ``logprob_token_ids`` (with logprobs on: per generated token the log-probabilities
of these ids, beside the sampled token's, replace the top-k: :func:`logprobs_asked`), ``cache_salt``
(only requests with the same salt share prefix-cache blocks; with keys, only within the sender's tenant:
see :func:`~nlora_serve.serving.request_policy.cache_salt_of`),
``truncate_prompt_tokens`` / ``truncation_side`` (:mod:`~nlora_serve.serving.http_api.truncation`),
``add_special_tokens``: completions true by default (a text prompt takes the tokenizer's special
tokens, a BOS on Llama-style models; token ids run as given), chat false only (the chat template
writes its own; true would add a second BOS), both vLLM's defaults. Completions take ``echo``
(the prompt first in the text and, with ``logprobs``, in the logprobs; ``max_tokens=0`` with it
returns the prompt alone), both endpoints vLLM's ``prompt_logprobs`` (0..20, not with ``stream``):
shapes and rules in :mod:`~nlora_serve.serving.http_api.echo`; with ``n`` > 1 every choice starts
with the echoed prompt (and its logprobs), as vLLM 0.32's. Chat's ``echo=true`` (vLLM's: the last
message prepended to the reply) is refused.

A completion's ``prompt`` may be a batch, as in OpenAI's and vLLM 0.32's API (lm-evaluation-harness's
``local-completions`` sends one with ``batch_size`` > 1): a list of texts or of token-id lists, up to
1,024 (vLLM's limit), each prompt run with the same params (shapes and bounds:
:mod:`~nlora_serve.serving.http_api.prompts`). Choice j of prompt i has index ``i * n + j`` and, with
a ``seed``, samples with ``seed + j``; echo, logprobs and ``prompt_logprobs`` are each prompt's own;
usage sums the prompts (each once) and every choice's tokens. Each (prompt, choice) is an engine
request (:mod:`~nlora_serve.serving.http_api.choices`), so prompts x n must fit ``--max-queue`` and
the tenant's quota. An empty list, a list mixing texts and id lists, an empty prompt inside a batch
are refused naming ``prompt``.
"""

from __future__ import annotations

import dataclasses
import json
import re

from nlora_serve.errors import shown
from nlora_serve.serving.chat_template import check_plain, render_chat, template_kwargs
from nlora_serve.serving.http_api.body_bounds import check_prompt_count
from nlora_serve.serving.http_api.prompts import prompts_of
from nlora_serve.serving.http_api.request_models import (ChatMessage, ChatRequest, CompletionRequest, OpenAIRequest,
                                                         ParamError, as_param_error, check_fields)
from nlora_serve.serving.http_api.structured import structured_of
from nlora_serve.serving.request_policy import check_min_tokens_unset_max, completion_unset_max_tokens, max_tokens_of
from nlora_serve.engine.sample.sampling import MAX_LOGPROBS, RequestError, SamplingParams
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.serving.server_config import ServerConfig

_TOKEN_ID = re.compile(r"[0-9]{1,19}")  # a logit_bias key: 19 digits reach past any vocabulary


MAX_REQUEST_ID = 1024  # characters: the id goes out on every chunk of a stream


def response_id_of(header: str | None, request: OpenAIRequest) -> str | None:
    """The client's id for the response (vLLM's: the X-Request-Id header, else the body's
    ``request_id``); None: a random one.

    Raises:
        ParamError: one over :data:`MAX_REQUEST_ID` characters.
    """
    given = header if header is not None else request.request_id
    if given is not None and len(given) > MAX_REQUEST_ID:
        raise ParamError(f"request_id is {len(given)} characters; at most {MAX_REQUEST_ID}", "request_id")
    return given


def logprobs_asked(request: OpenAIRequest) -> int | None:
    """The top-k log-probabilities a request asks per generated token; None: none (chat: its
    ``top_logprobs``, 0 when unset, with ``logprobs`` true; completions: its ``logprobs``).

    With vLLM's ``logprob_token_ids`` (which needs logprobs on) those ids replace the top-k: each
    token's entry is the sampled token and the ids, all of them returned in that order (vLLM 0.32's
    ``_create_chat_logprobs`` / ``_create_completion_logprobs`` with ``logprob_token_ids``); the
    count then only shapes an echoed prompt's entries, and the engine gets no top-k (vLLM's
    ``to_sampling_params``: ``logprobs=None`` with ids).
    """
    if isinstance(request, ChatRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def _check_logprob_token_ids(request: OpenAIRequest) -> None:
    """vLLM 0.32's protocol checks of ``logprob_token_ids`` (its ``check_logprobs``; an empty list is unset).

    Raises:
        ParamError: ids without logprobs; with echo and max_tokens 0 (completions).
    """
    if not request.logprob_token_ids:
        return
    if isinstance(request, ChatRequest):
        if not request.logprobs:
            raise ParamError("when using `logprob_token_ids`, `logprobs` must be set to true.", "logprob_token_ids")
        return
    if request.echo and request.max_tokens == 0:
        raise ParamError("`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because no output "
                         "tokens are generated.", "logprob_token_ids")
    if request.logprobs is None:
        raise ParamError("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")


def sampling_of(request: OpenAIRequest, config: ServerConfig, logprobs: int | None,
                prompt_logprobs: int | None = None, tool_schema: dict | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request (``logprobs``: top-k per token, replaced by the
    request's ``logprob_token_ids`` where it sends some; ``prompt_logprobs``: per prompt token; None =
    off; ``tool_schema``: the JSON schema a tool_choice forces, http_api/tools.py).

    Raises:
        ParamError: a field out of range (named).
    """
    field, requested = "max_tokens", request.max_tokens
    if getattr(request, "max_completion_tokens", None) is not None:
        field, requested = "max_completion_tokens", request.max_completion_tokens
    if requested == 0 and getattr(request, "echo", False):
        requested = 1  # vLLM's echo without generation: one token computed, only the prompt returned
    try:
        structured = structured_of(request.response_format, request.structured_outputs)
    except RequestError as exc:
        raise ParamError(str(exc), exc.param) from None
    if tool_schema is not None:
        if structured is not None:  # vLLM's words
            raise ParamError("You can only either use constraints for structured outputs or tools, not both.", None)
        structured = StructuredOutputs(json=json.dumps(tool_schema), param="tools")
    with as_param_error():
        if requested is not None and requested < 1:
            raise RequestError(f"{field} must be >= 1; got {requested}")
        if requested is None and isinstance(request, CompletionRequest):
            max_tokens = completion_unset_max_tokens(config, request.min_tokens)  # vLLM's and OpenAI's 16
        else:
            max_tokens = max_tokens_of(requested, config)
            if requested is None:
                check_min_tokens_unset_max(request.min_tokens, config, "min_tokens")
        default = config.sampling_defaults.value  # the field sent, else the server's default, else the API's
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=request.min_tokens,
            temperature=default("temperature", request.temperature, 1.0),
            top_p=default("top_p", request.top_p, 1.0), top_k=default("top_k", request.top_k, 0),
            min_p=default("min_p", request.min_p, 0.0), seed=request.seed,
            stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
            stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            presence_penalty=default("presence_penalty", request.presence_penalty, 0.0),
            frequency_penalty=default("frequency_penalty", request.frequency_penalty, 0.0),
            repetition_penalty=default("repetition_penalty", request.repetition_penalty, 1.0),
            logit_bias=_logit_bias(request.logit_bias), prompt_logprobs=prompt_logprobs,
            logprobs=None if request.logprob_token_ids else logprobs,
            logprob_token_ids=tuple(request.logprob_token_ids) if request.logprob_token_ids else None,
            allowed_token_ids=request.allowed_token_ids, bad_words=tuple(request.bad_words or ()),
            structured_outputs=structured)


def _logit_bias(field: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys, i.e. decimal strings) as pairs.

    Raises:
        RequestError: a key that is not a decimal token id (ranges: see SamplingParams).
    """
    pairs = []
    for key, bias in (field or {}).items():
        if not _TOKEN_ID.fullmatch(key):
            raise RequestError(f"logit_bias keys must be token ids (decimal strings, e.g. \"50256\"); got {key[:40]!r}")
        pairs.append((int(key), bias))
    return tuple(pairs)


def completion_inputs(request: CompletionRequest,
                      config: ServerConfig) -> tuple[list[str | list[int]], SamplingParams]:
    """(engine prompts, sampling params) of a completion request: one prompt, or each of a batch
    (``prompt`` a list of texts or of token-id lists, as vLLM 0.32 takes it), each run with the same
    params.

    Raises:
        ParamError: an unsupported field, an empty prompt, more than MAX_PROMPTS prompts, a
            field out of range, prompt_logprobs with stream (:func:`prompt_logprobs_of`),
            logprob_token_ids without logprobs.
    """
    check_fields(request)
    _check_logprob_token_ids(request)
    prompts = prompts_of(request.prompt)
    check_prompt_count(len(prompts))
    if not prompts[0]:
        raise ParamError("prompt is empty: need at least one token", "prompt")
    return prompts, sampling_of(request, config, request.logprobs, scored_prompt_logprobs(request))


def scored_prompt_logprobs(request: CompletionRequest) -> int | None:
    """The top-k each prompt token of a completion request is scored to: its ``prompt_logprobs``,
    else with echo its ``logprobs`` (vLLM 0.32's ``CompletionRequest.to_sampling_params``, whose
    response then carries them as ``prompt_logprobs`` too), else None. An echoed token's entries
    are cut from that score (echo.py's ``echoed_top``), so a K below the ``logprobs`` N gives it
    at most K + 1, as in vLLM.

    Raises:
        ParamError: a bad ``prompt_logprobs`` (:func:`prompt_logprobs_of`).
    """
    wanted = prompt_logprobs_of(request)
    return request.logprobs if wanted is None and request.echo else wanted


def prompt_logprobs_of(request: CompletionRequest | ChatRequest) -> int | None:
    """The request's ``prompt_logprobs``, checked.

    Raises:
        ParamError: out of [0, MAX_LOGPROBS] (vLLM's -1, the whole vocabulary, is over its default
            max_logprobs of 20 too), or with stream=true (vLLM refuses it above 0; a 0 would come
            back nowhere in a stream).
    """
    value = request.prompt_logprobs
    if value is None:
        return None
    if not 0 <= value <= MAX_LOGPROBS:
        raise ParamError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}]; got {value}", "prompt_logprobs")
    if request.stream:
        why = ("as in vLLM" if value else
               "a stream has no place for them; vLLM accepts 0 here and returns nothing")
        raise ParamError(f"prompt_logprobs is not available with stream=true ({why}); send stream=false, or "
                         "echo=true with logprobs on /v1/completions", "prompt_logprobs")
    return value


def chat_params(request: ChatRequest, config: ServerConfig) -> SamplingParams:
    """The sampling params of a chat request (cheap: checked before admission, on the event loop).

    Raises:
        ParamError: an unsupported field, a field out of range, top_logprobs > 0 without logprobs,
            add_special_tokens=true, echo=true (vLLM's chat echo is another thing), prompt_logprobs
            (:func:`prompt_logprobs_of`), logprob_token_ids without logprobs.
    """
    if (request.model_extra or {}).get("echo") is True:
        raise ParamError("echo=true is not supported on /v1/chat/completions (vLLM's chat echo prepends the last "
                         "message to the reply); for the prompt's log-probabilities send prompt_logprobs", "echo")
    check_fields(request)
    if request.add_special_tokens:
        raise ParamError("add_special_tokens=true is not supported on /v1/chat/completions: the chat template "
                         "writes the model's special tokens itself (a second BOS would follow)", "add_special_tokens")
    if request.continue_final_message and request.add_generation_prompt:
        raise ParamError("continue_final_message=true needs add_generation_prompt=false: the final message is "
                         "continued, no new assistant turn is opened (vLLM's rule)", "continue_final_message")
    _check_logprob_token_ids(request)
    top = request.top_logprobs  # with logprob_token_ids unused: any count vLLM's protocol takes
    if top is not None and not (0 <= top <= MAX_LOGPROBS or request.logprob_token_ids and top >= -1):
        raise ParamError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]; got {request.top_logprobs}",
                         "top_logprobs")
    if request.top_logprobs and not request.logprobs:  # 0 without logprobs asks nothing: accepted, as vLLM
        raise ParamError("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        tools, tool_schema = request.tool_calls(config.auto_tool_parser)
    except RequestError as exc:  # vLLM's messages and params (None where vLLM names none)
        raise ParamError(str(exc), exc.param) from None
    params = sampling_of(request, config, logprobs_asked(request), prompt_logprobs_of(request), tool_schema)
    if tools is not None and config.tool_call_parser == "hermes":
        # vLLM's hermes parser keeps special tokens in the text: <tool_call> is one in some models
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params


def chat_prompt(request: ChatRequest, tokenizer,
                chat_bounds: tuple[int | None, int | None] = (None, None), field: str = "messages") -> list[int]:
    """The prompt token ids of a chat request (or a /tokenize chat body) under the chat template,
    with its ``add_generation_prompt`` and ``continue_final_message`` (the expensive step: run on the
    tokenizer thread, once the request is admitted). ``field``: the request field a refusal of the
    messages names (/v1/responses': ``input``, whose messages they are).

    Raises:
        ParamError: no messages or an unknown role, a part that is not text, special-token text
            inside the tools the template renders (param ``tools``), contents or messages over
            ``chat_bounds`` (max_bytes, max_messages of
            :func:`~nlora_serve.serving.chat_template.render_chat`).
    """
    messages = [_message_dict(m, i) for i, m in enumerate(request.messages)]
    # the tools' template dicts made only where the template reads them (100k tools that it does not
    # read made 100k dicts beside 100k live models: 0.3-0.4 s of full collections on the tokenizer thread)
    extra = {"tools": request.tools or None, "documents": request.documents,
             "reasoning_effort": request.reasoning_effort}
    if request.reasoning_effort is not None:  # vLLM's: templates that need opting in to thinking
        extra["enable_thinking"] = request.reasoning_effort != "none"
    with as_param_error("chat_template_kwargs"):
        kwargs = template_kwargs(tokenizer, request.chat_template_kwargs or {}, extra)
    if request.tools and "tools" in kwargs:
        kwargs["tools"] = extra["tools"] = [t.template_dict() for t in request.tools]
    if request.tools and "tools" in kwargs:  # rendered: refused naming tools (else render_chat's names field)
        with as_param_error("tools"):
            check_plain(extra["tools"], tokenizer, "tools: special-token text {hit!r} inside a tool")
    with as_param_error(field):
        return render_chat(messages, tokenizer, field, *chat_bounds, request.add_generation_prompt,
                           request.continue_final_message, kwargs)


def _message_dict(message: ChatMessage, index: int) -> dict:
    """A message as the chat template reads it (vLLM's: an assistant's tool call arguments parsed
    from their JSON text, content None as "").

    Raises:
        ParamError: a part that is not text, tool call arguments that are not JSON.
    """
    out = {"role": message.role, "content": "" if message.content is None else _message_text(message, index)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            function = call.get("function")
            if not isinstance(function, dict):
                raise ParamError("chat completions only support assistant tool_calls of type 'function'.",
                                 "tool_calls")
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    raise ParamError(f"messages[{index}].tool_calls: arguments are not JSON", "messages") from None
                except RecursionError:  # nested past the parser: was a 500
                    raise ParamError(f"messages[{index}].tool_calls: arguments are nested too deeply to parse",
                                     "messages") from None
            calls.append({**call, "function": {**function, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def _message_text(message: ChatMessage, index: int) -> str:
    """A message's content; text parts joined by newlines (as vLLM does).

    Raises:
        ParamError: a part that is not text (images, audio, files), a text part without its text
            string, or one with fields beyond ``type`` and ``text``; each names the part.
    """
    if isinstance(message.content, str):
        return message.content
    for j, part in enumerate(message.content):
        where = f"messages[{index}].content[{j}]"
        if part.type != "text":
            raise ParamError(f"{where} is a {shown(part.type)!r} part: this server reads text parts only "
                             "({'type': 'text', 'text': ...})", "messages")
        if part.text is None:
            raise ParamError(f"{where}.text is missing or null: a text part carries its text as a string",
                             "messages")
        if part.model_extra:
            extra = ", ".join(repr(shown(name, 40)) for name in list(part.model_extra)[:4])
            raise ParamError(f"{where} has fields other than 'type' and 'text' ({extra}"
                             f"{', ...' if len(part.model_extra) > 4 else ''}): a text part takes only those",
                             "messages")
    return "\n".join(part.text for part in message.content)
