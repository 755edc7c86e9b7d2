"""The OpenAI API's request bodies (completions, chat) as pydantic models, and the refusal of the
fields this server does not implement (:func:`check_fields`): what a request may hold, before
:mod:`~nlora_serve.serving.http_api.openai` turns it into engine inputs. The rules are described
there."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from nlora_serve.serving.http_api.prompts import check_prompt_shape
from nlora_serve.serving.http_api.tools import Tool, ToolCalls, tool_calls_of
from nlora_serve.serving.request_policy import check_cache_salt
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.errors import shown

# OpenAI fields we accept only at their no-op value or null; every other field is refused
NOOP_VALUES: dict[str, tuple] = {
    "echo": (False,), "suffix": ("",), "function_call": ("none",),
    # chat's output modalities: text only (audio output, and its ``audio`` parameters, null only)
    "modalities": (["text"],), "audio": (),
    # vLLM's: beam search and watermarking change the output; priority needs priority scheduling
    "use_beam_search": (False,), "watermarking": (False,), "priority": (0,),
}
# vLLM 0.32 fields that change nothing on a generation endpoint (beam search's length_penalty; the
# render endpoints' token offsets and multimodal payloads; MoE routing data; custom extensions' args;
# a reasoning parser's switch; a session id for KV-transfer routing): accepted at any value, as vLLM
# accepts them
IGNORED = frozenset({"length_penalty", "return_token_offsets", "mm_payload", "return_mm_kwargs",
                     "routed_experts_prompt_start", "vllm_xargs", "include_reasoning", "session_id"})
# OpenAI chat fields that change nothing in an answer here: storage and tags for OpenAI's own dashboards
# (store, metadata), its billing tier, its prompt-cache routing hints (prefix caching here is automatic),
# an end user's id (as ``user``), a Predicted Output (a latency hint: the answer is the same). vLLM 0.32
# takes them too (its request models allow extra fields), so clients that send them keep working;
# accepted at any value
OPENAI_IGNORED = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                            "prompt_cache_options", "safety_identifier", "prediction"})
_FIELD = re.compile(r"^(?:SamplingParams\.)?(\w+)")


class ParamError(RequestError):
    """A request field this server cannot honour (HTTP 400); ``param`` names it, as OpenAI's
    error ``param`` does."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message, param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = False  # one last chunk with usage and no choices (null: false, as vLLM)
    continuous_usage_stats: bool | None = False  # vLLM's: with include_usage, every chunk has the usage so far
    # OpenAI's random padding of chunks (a side-channel mitigation): none here, so false or null only
    include_obfuscation: bool | None = None


class OpenAIRequest(BaseModel):
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
    stream: bool | None = False  # null: false (vLLM's bool | None; OpenAI's "boolean or null")
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
    # vLLM's: false (with skip_special_tokens false) writes adjacent added tokens without a space
    # between them (engine/detokenizer.py)
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be sampled (engine/sample/token_masks.py)
    bad_words: list[str] | None = None  # vLLM's: words never generated (engine/sample/token_masks.py)
    return_tokens_as_token_ids: bool | None = False  # null: false, as vLLM's bool | None
    # vLLM's: per generated token the log-probabilities of these ids (and the sampled token's) instead
    # of the top-k; needs logprobs (http_api/openai.py's logprobs_asked)
    logprob_token_ids: list[int] | None = None
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
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    @property
    def max_tokens_given(self) -> bool:
        """False when the request leaves max_tokens (and max_completion_tokens) unset."""
        return self.max_tokens is not None or getattr(self, "max_completion_tokens", None) is not None


class CompletionRequest(OpenAIRequest):
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


# reasoning_effort's values, vLLM 0.32's and OpenAI's (chat's reasoning_effort, Responses' reasoning.effort):
# another (a typo of "high") is a 400, as in vLLM, never passed on to a template that would not match it
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


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


class ChatRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool | None = False  # null: false (vLLM's bool | None; the SDK sends null for logprobs=None)
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
    reasoning_effort: ReasoningEffort | None = None  # the template's ``reasoning_effort`` (and enable_thinking), as vLLM

    def tool_calls(self, auto_parser: str | None = None) -> tuple[ToolCalls | None, dict | None]:
        """See :func:`~nlora_serve.serving.http_api.tools.tool_calls_of` (raises RequestError);
        ``auto_parser``: the server's parser of tool_choice "auto" (ServerConfig.auto_tool_parser)."""
        return tool_calls_of(self.tools, self.tool_choice, "tool_choice" in self.model_fields_set,
                             self.parallel_tool_calls, auto_parser)


@contextlib.contextmanager
def as_param_error(param: str | None = None) -> Iterator[None]:
    """RequestError -> ParamError naming ``param`` (or the field the message starts with)."""
    try:
        yield
    except ParamError:
        raise
    except RequestError as exc:
        message = str(exc).replace("SamplingParams.", "")
        match = _FIELD.match(message)
        raise ParamError(message, param or (match.group(1) if match else None)) from None


# what to send instead of another server's field that means something here (h130: a LoRAX user's adapter_id)
_INSTEAD = {"adapter_id": "name the adapter in 'model' instead (LoRAX's adapter_id; as vLLM's LoRA requests)"}


def unsupported(field: str) -> ParamError:
    """The refusal of a request field this server does not implement."""
    instead = f"; {_INSTEAD[field]}" if field in _INSTEAD else ""
    return ParamError(f"unsupported field {shown(field)!r}: this server does not implement it (at any value, "
                      f"null and [] included); remove it{instead}", field)


def check_fields(request: OpenAIRequest) -> None:
    """Refuse every field we do not implement, and no-op fields at another value.

    Raises:
        ParamError: the first such field (named in the message and in ``param``), stream_options
            without stream, a cache_salt over :data:`~nlora_serve.serving.request_policy.MAX_CACHE_SALT`
            characters.
    """
    for field, value in (request.model_extra or {}).items():
        if field in IGNORED or field in OPENAI_IGNORED:
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
            allowed = " or ".join(repr(v) for v in NOOP_VALUES[field]) or "null"
            raise ParamError(f"{field}={shown(repr(value))} is not supported: this server accepts only {allowed}", field)
    if request.return_token_ids and getattr(request, "echo", False):
        raise ParamError("return_token_ids with echo=true is not supported (vLLM then echoes no prompt text); "
                         "the prompt's ids come in prompt_token_ids", "return_token_ids")
    if request.stream_options is not None and not request.stream:
        raise ParamError("stream_options is only allowed with stream=true", "stream_options")
    if request.stream_options is not None and request.stream_options.include_obfuscation:
        raise ParamError("stream_options.include_obfuscation=true is not supported: this server pads no chunk with "
                         "an obfuscation field; send false or leave it out", "stream_options.include_obfuscation")
    with as_param_error("cache_salt"):
        check_cache_salt(request.cache_salt, "cache_salt")
