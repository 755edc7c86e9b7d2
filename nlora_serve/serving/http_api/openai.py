"""OpenAI API requests -> engine inputs, for the HTTP front end (no I/O).

Requests are pydantic models of the fields we implement. Every other field is refused with a 400
that names it (:class:`ParamError`), never silently ignored, also when it is null; a few OpenAI
fields are accepted at their no-op value or null only (:data:`NOOP_VALUES`: chat's ``echo=false``, ...).
``n`` choices are n engine requests, choice i seeded ``seed + i`` (vLLM 0.32's rule; see
:mod:`~nlora_serve.serving.http_api.choices`); n > 1 with greedy sampling is refused as vLLM refuses
it, ``best_of`` is accepted only null or equal to n (vLLM 0.32 drops the field). Chat messages take
the ``developer`` role and a ``name``, both given to the chat template as they are (vLLM's way);
``top_logprobs: 0`` without ``logprobs`` asks nothing. Chat's ``tools`` and ``tool_choice`` are served
as vLLM 0.32 serves them (:mod:`~nlora_serve.serving.http_api.tools`: named and "required" forced
by a JSON schema, "auto" refused in vLLM's words); the legacy ``functions`` is refused at every value.
``chat_template_kwargs``, ``documents`` and ``reasoning_effort`` are template variables
(:func:`~nlora_serve.serving.chat_template.template_kwargs`); ``allowed_token_ids`` and ``bad_words``
vLLM's token masks (:mod:`~nlora_serve.engine.token_masks`). :data:`IGNORED` fields change nothing
in vLLM on these endpoints and are accepted at any value. ``user`` (an end-user id for abuse
tracking) is accepted and changes nothing, as at OpenAI.

``response_format`` (text, json_object, json_schema) and vLLM's ``structured_outputs`` constrain the
output (:mod:`~nlora_serve.serving.http_api.structured`).

``logit_bias`` keys are token ids as decimal strings (OpenAI's form). An unset sampling field takes
the server's default (the model's generation_config.json under ``--generation-config auto``, and
``--override-generation-config``: :mod:`~nlora_serve.serving.generation_config`), else the OpenAI
API's: ``temperature`` 1, ``top_p`` 1; ``max_tokens`` unset is the rest of
the context (max_model_len - prompt tokens, as vLLM; at most ``--max-tokens`` and the generation
config's max_new_tokens: see :func:`~nlora_serve.serving.stream.start_request`). Extensions, under vLLM's
names (send them in ``extra_body``): ``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``return_tokens_as_token_ids`` (logprob tokens as
``"token_id:<id>"``), ``cache_salt`` (only requests with the same salt share prefix-cache blocks; with keys, only
within the sender's tenant: see :func:`~nlora_serve.serving.request_policy.cache_salt_of`),
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

import contextlib
import json
import re
from collections.abc import Iterator
from pydantic import BaseModel, ConfigDict, field_validator

from nlora_serve.serving.chat_template import render_chat, template_kwargs
from nlora_serve.serving.http_api.prompts import MAX_PROMPTS, check_prompt_shape, prompts_of
from nlora_serve.serving.http_api.structured import structured_of
from nlora_serve.serving.http_api.tools import Tool, ToolCalls, tool_calls_of
from nlora_serve.serving.request_policy import check_cache_salt, check_min_tokens_unset_max, max_tokens_of
from nlora_serve.engine.sampling import MAX_LOGPROBS, RequestError, SamplingParams
from nlora_serve.engine.structured import StructuredOutputs
from nlora_serve.serving.server_config import ServerConfig

# OpenAI fields we accept only at their no-op value or null; every other field is refused
NOOP_VALUES: dict[str, tuple] = {
    "echo": (False,), "suffix": ("",), "function_call": ("none",),
    # vLLM's: beam search and watermarking change the output; priority needs priority scheduling
    "use_beam_search": (False,), "watermarking": (False,), "priority": (0,),
}
# vLLM 0.32 fields that change nothing on a generation endpoint (beam search's length_penalty; the
# render endpoints' token offsets and multimodal payloads; MoE routing data; custom extensions' args;
# a reasoning parser's switch; a session id for KV-transfer routing): accepted at any value, as vLLM
# accepts them
IGNORED = frozenset({"length_penalty", "return_token_offsets", "mm_payload", "return_mm_kwargs",
                     "routed_experts_prompt_start", "vllm_xargs", "include_reasoning", "session_id"})
_FIELD = re.compile(r"^(?:SamplingParams\.)?(\w+)")
_TOKEN_ID = re.compile(r"[0-9]{1,19}")  # a logit_bias key: 19 digits reach past any vocabulary


class ParamError(RequestError):
    """A request field this server cannot honour (HTTP 400); ``param`` names it, as OpenAI's
    error ``param`` does."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message, param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False  # one last chunk with usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk has the usage so far


class _Request(BaseModel):
    """Fields both endpoints share."""

    # extra fields are refused one by one in check_fields, with a clear message; strict: "5" is not
    # an integer and true is not a number (refused, never coerced)
    model_config = ConfigDict(extra="allow", strict=True)
    model: str  # an adapter name, or the base model's served name
    max_tokens: int | None = None
    temperature: float | None = None  # None = 1 (OpenAI's default)
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias in [-100, 100]}, OpenAI's
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None  # extensions (vLLM's names) from here on
    min_p: float | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # false: special tokens' text (not a stop token's) stays in the text
    # vLLM's: false (with skip_special_tokens false) is refused: see chat_params
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be sampled (engine/token_masks.py)
    bad_words: list[str] | None = None  # vLLM's: words never generated (engine/token_masks.py)
    return_tokens_as_token_ids: bool = False
    cache_salt: str | None = None  # prefix-cache sharing group (vLLM's field; see request_policy.cache_salt_of)
    request_id: str | None = None  # vLLM's: the response id's tail ("cmpl-<request_id>"); X-Request-Id wins
    return_token_ids: bool | None = None  # vLLM's: token ids beside the text (http_api/responses.py)
    n: int | None = None  # choices (None = 1): each an engine request of its own (http_api/choices.py)
    best_of: int | None = None  # null or n only: vLLM 0.32 drops the field (we refuse what we would ignore)
    # vLLM's: keep the prompt's last k tokens (-1: max_model_len - 1); truncation_side "right" keeps the first k
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None  # None = "left" (vLLM's side for generation)
    # OpenAI's text / json_object / json_schema, and vLLM's json / regex / choice / grammar (http_api/structured.py)
    response_format: dict | None = None
    structured_outputs: dict | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def max_tokens_given(self) -> bool:
        """False when the request leaves max_tokens (and max_completion_tokens) unset."""
        return self.max_tokens is not None or getattr(self, "max_completion_tokens", None) is not None


class CompletionRequest(_Request):
    """POST /v1/completions. ``prompt``: text, token ids, or a batch: a list of texts or of token-id
    lists (:func:`~nlora_serve.serving.http_api.prompts.check_prompt_shape` refuses the others before
    the types are checked)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    # per token its log-probability and top_logprobs: the token and the top-k (0..20), so up to
    # k + 1 entries (OpenAI's rule, vLLM's; http_api/echo.py's with_token)
    logprobs: int | None = None
    # the prompt before the text (with logprobs, its tokens first: http_api/echo.py); null = false, as vLLM
    echo: bool | None = False
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-probability and top-k (0..20)
    # a text prompt takes the tokenizer's special tokens (a BOS), as vLLM's CompletionRequest
    add_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_shape(cls, prompt):
        """Raises PydanticCustomError for a list of no prompt's shape (see :func:`check_prompt_shape`)."""
        return check_prompt_shape(prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked in _message_text: text parts only
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str  # system, developer (OpenAI's newer system), user, assistant or tool
    content: str | list[ContentPart] | None = None  # None: "" (an assistant turn of tool calls)
    name: str | None = None  # the participant's name: passed to the chat template, as vLLM does
    tool_calls: list[dict] | None = None  # an assistant's earlier calls: to the template, arguments parsed
    tool_call_id: str | None = None  # a tool message's call: to the template
    # the null fields of a response message (OpenAI's, vLLM's), as a client appends it to its history:
    # accepted at null only (a value would be something the template never sees)
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None
    reasoning: None = None
    reasoning_content: None = None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..20; above 0 needs logprobs=true (0 without it: no logprobs, as vLLM)
    add_special_tokens: bool = False  # false only (vLLM's default): the chat template writes the special tokens
    add_generation_prompt: bool = True  # vLLM's: append the assistant's turn header
    continue_final_message: bool = False  # vLLM's: leave the final message open (needs add_generation_prompt false)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-probability and top-k (0..20)
    tools: list[Tool] | None = None  # to the chat template; with tool_choice (http_api/tools.py)
    tool_choice: str | dict | None = None  # unset: "auto" with tools, else "none" (vLLM's defaults)
    parallel_tool_calls: bool | None = True  # false: one tool call at most
    # extra chat template variables (vLLM's: the ones the template reads; see chat_template.template_kwargs)
    chat_template_kwargs: dict | None = None
    documents: list[dict[str, str]] | None = None  # the template's ``documents`` (RAG), as vLLM
    reasoning_effort: str | None = None  # the template's ``reasoning_effort`` (and enable_thinking), as vLLM

    def tool_calls(self) -> tuple[ToolCalls | None, dict | None]:
        """See :func:`~nlora_serve.serving.http_api.tools.tool_calls_of` (raises RequestError)."""
        return tool_calls_of(self.tools, self.tool_choice, "tool_choice" in self.model_fields_set,
                             self.parallel_tool_calls)


@contextlib.contextmanager
def _as_param_error(param: str | None = None) -> Iterator[None]:
    """RequestError -> ParamError naming ``param`` (or the field the message starts with)."""
    try:
        yield
    except ParamError:
        raise
    except RequestError as exc:
        message = str(exc).replace("SamplingParams.", "")
        match = _FIELD.match(message)
        raise ParamError(message, param or (match.group(1) if match else None)) from None


def unsupported(field: str) -> ParamError:
    """The refusal of a request field this server does not implement."""
    return ParamError(f"unsupported field {field!r}: this server does not implement it (at any value, "
                      "null and [] included); remove it", field)


def check_fields(request: _Request) -> None:
    """Refuse every field we do not implement, and no-op fields at another value.

    Raises:
        ParamError: the first such field (named in the message and in ``param``), stream_options
            without stream, a cache_salt over :data:`~nlora_serve.serving.request_policy.MAX_CACHE_SALT`
            characters.
    """
    for field, value in (request.model_extra or {}).items():
        if field in IGNORED:
            continue
        if field == "thinking_token_budget" and (value is None or (type(value) is int and value == -1)):
            continue  # unset / unlimited, as vLLM takes them without a reasoning parser
        if field == "thinking_token_budget":  # vLLM's refusal without --reasoning-parser
            raise ParamError("thinking_token_budget is set but reasoning_config is not configured. Please set "
                             "--reasoning-parser and/or --reasoning-config to use thinking_token_budget.", field)
        if field == "chat_template":  # vLLM's refusal without --trust-request-chat-template
            raise ParamError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                             "Refused request with untrusted chat template.", field)
        if field not in NOOP_VALUES:
            raise unsupported(field)
        # same type and value: `True in (1,)` and `1.0 in (1,)` hold in Python, and JSON's true is no 1
        if value is not None and not any(type(value) is type(v) and value == v for v in NOOP_VALUES[field]):
            allowed = " or ".join(repr(v) for v in NOOP_VALUES[field])
            raise ParamError(f"{field}={value!r} is not supported: this server accepts only {allowed}", field)
    if request.return_token_ids and getattr(request, "echo", False):
        raise ParamError("return_token_ids with echo=true is not supported (vLLM then echoes no prompt text); "
                         "the prompt's ids come in prompt_token_ids", "return_token_ids")
    if request.stream_options is not None and not request.stream:
        raise ParamError("stream_options is only allowed with stream=true", "stream_options")
    with _as_param_error("cache_salt"):
        check_cache_salt(request.cache_salt, "cache_salt")


MAX_REQUEST_ID = 1024  # characters: the id goes out on every chunk of a stream


def response_id_of(header: str | None, request: _Request) -> str | None:
    """The client's id for the response (vLLM's: the X-Request-Id header, else the body's
    ``request_id``); None: a random one.

    Raises:
        ParamError: one over :data:`MAX_REQUEST_ID` characters.
    """
    given = header if header is not None else request.request_id
    if given is not None and len(given) > MAX_REQUEST_ID:
        raise ParamError(f"request_id is {len(given)} characters; at most {MAX_REQUEST_ID}", "request_id")
    return given


def sampling_of(request: _Request, config: ServerConfig, logprobs: int | None,
                prompt_logprobs: int | None = None, tool_schema: dict | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request (``logprobs``: top-k per token, ``prompt_logprobs``:
    per prompt token; None = off; ``tool_schema``: the JSON schema a tool_choice forces, http_api/tools.py).

    Raises:
        ParamError: a field out of range (named), or max_tokens over the server's ``--max-tokens``.
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
    if not request.spaces_between_special_tokens and not request.skip_special_tokens:
        raise ParamError("spaces_between_special_tokens=false with skip_special_tokens=false is not supported: the "
                         "text keeps the tokenizer's own spacing between special tokens", "spaces_between_special_tokens")
    with _as_param_error():
        if requested is not None and requested < 1:
            raise RequestError(f"{field} must be >= 1; got {requested}")
        max_tokens = max_tokens_of(requested, config, field)
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
            presence_penalty=default("presence_penalty", request.presence_penalty, 0.0),
            frequency_penalty=default("frequency_penalty", request.frequency_penalty, 0.0),
            repetition_penalty=default("repetition_penalty", request.repetition_penalty, 1.0),
            logit_bias=_logit_bias(request.logit_bias), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
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
            field out of range, prompt_logprobs with stream (:func:`prompt_logprobs_of`).
    """
    check_fields(request)
    prompts = prompts_of(request.prompt)
    if len(prompts) > MAX_PROMPTS:
        raise ParamError(f"prompt list length {len(prompts)} exceeds the maximum allowed count of {MAX_PROMPTS} "
                         "(vLLM's VLLM_MAX_COMPLETION_PROMPTS default)", "prompt")
    if not prompts[0]:
        raise ParamError("prompt is empty: need at least one token", "prompt")
    # echo with logprobs scores the prompt too (vLLM's: prompt_logprobs defaults to logprobs; the
    # engine computes the larger, the response slices each)
    wanted = prompt_logprobs_of(request)
    if request.echo and request.logprobs is not None:
        wanted = max(wanted if wanted is not None else 0, request.logprobs)
    return prompts, sampling_of(request, config, request.logprobs, wanted)


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
        raise ParamError("prompt_logprobs is not available with stream=true (as in vLLM); send stream=false, or "
                         "echo=true with logprobs on /v1/completions", "prompt_logprobs")
    return value


def chat_params(request: ChatRequest, config: ServerConfig) -> SamplingParams:
    """The sampling params of a chat request (cheap: checked before admission, on the event loop).

    Raises:
        ParamError: an unsupported field, a field out of range, top_logprobs > 0 without logprobs,
            add_special_tokens=true, echo=true (vLLM's chat echo is another thing), prompt_logprobs
            (:func:`prompt_logprobs_of`).
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
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_LOGPROBS:
        raise ParamError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]; got {request.top_logprobs}",
                         "top_logprobs")
    if request.top_logprobs and not request.logprobs:  # 0 without logprobs asks nothing: accepted, as vLLM
        raise ParamError("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        _, tool_schema = request.tool_calls()
    except RequestError as exc:  # vLLM's messages and params (None where vLLM names none)
        raise ParamError(str(exc), exc.param) from None
    return sampling_of(request, config, (request.top_logprobs or 0) if request.logprobs else None,
                       prompt_logprobs_of(request), tool_schema)


def chat_prompt(request: ChatRequest, tokenizer,
                chat_bounds: tuple[int | None, int | None] = (None, None)) -> list[int]:
    """The prompt token ids of a chat request (or a /tokenize chat body) under the chat template,
    with its ``add_generation_prompt`` and ``continue_final_message`` (the expensive step: run on the
    tokenizer thread, once the request is admitted).

    Raises:
        ParamError: no messages or an unknown role, a part that is not text, contents or messages
            over ``chat_bounds`` (max_bytes, max_messages of
            :func:`~nlora_serve.serving.chat_template.render_chat`).
    """
    messages = [_message_dict(m, i) for i, m in enumerate(request.messages)]
    extra = {"tools": [t.template_dict() for t in request.tools] if request.tools else None,
             "documents": request.documents, "reasoning_effort": request.reasoning_effort}
    if request.reasoning_effort is not None:  # vLLM's: templates that need opting in to thinking
        extra["enable_thinking"] = request.reasoning_effort != "none"
    with _as_param_error("chat_template_kwargs"):
        kwargs = template_kwargs(tokenizer, request.chat_template_kwargs or {}, extra)
    with _as_param_error("messages"):
        return render_chat(messages, tokenizer, "messages", *chat_bounds, request.add_generation_prompt,
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
            calls.append({**call, "function": {**function, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def _message_text(message: ChatMessage, index: int) -> str:
    """A message's content; text parts joined by newlines (as vLLM does).

    Raises:
        ParamError: a part that is not text (images, audio, files).
    """
    if isinstance(message.content, str):
        return message.content
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None or part.model_extra:
            raise ParamError(f"messages[{index}].content[{j}] is a {part.type!r} part: this server reads text "
                             "parts only ({'type': 'text', 'text': ...})", "messages")
    return "\n".join(part.text for part in message.content)
