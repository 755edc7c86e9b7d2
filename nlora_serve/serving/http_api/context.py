"""What the HTTP routes serve from (:class:`HttpContext`: the gRPC server's engine, keys, metrics
and admission) and OpenAI's error shape they answer in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from nlora_serve.engine.api import Engine, RequestAborted, max_prompt_bytes
from nlora_serve.errors import capped, shown
from nlora_serve.serving.admin_log import AdminRefusals
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.status import http_status_of
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.server_config import ServerConfig
from nlora_serve.serving.http_api.token_bytes import TokenText

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


@dataclass(slots=True)
class HttpContext:
    """What the routes serve from: the gRPC server's own engine, keys, metrics and admission."""

    engine: Engine  # the engine the gRPC server runs requests on (one per server)
    config: ServerConfig  # the server's settings (max_tokens, max_queue, served_model_name, ...)
    # API key -> Principal (tenant, grants); without a tenants file every caller is the local admin
    auth: Authenticator
    metrics: ServerMetrics  # the server's nlora_* metrics, shared with gRPC
    # the queue bound and per-tenant counts both front ends reserve against, and the tokenizer
    # stage (``admission.tokenizer``: prompts to token ids)
    admission: Admission
    tokenizer: object  # renders chat prompts and decodes logprob tokens
    base_model: str  # the base model's served name (GetServerInfo's ``model``)
    started: int = field(default_factory=lambda: int(time.time()))  # ``created`` of /v1/models entries
    chat_bounds: tuple[int, int] = (0, 0)  # chats past these (content characters, messages): refused untokenized
    token_text: TokenText = field(init=False)  # logprob tokens' strings, each decoded once per server
    # refused /v1/load_lora_adapter and /v1/unload_lora_adapter calls of known keys, in lora_admin's log
    admin_refusals: AdminRefusals = field(init=False)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)
        self.admin_refusals = AdminRefusals(logging.getLogger("nlora_serve.serving.http_api.lora_admin"))
        self.chat_bounds = (max_prompt_bytes(self.tokenizer, self.engine.max_model_len), self.engine.max_model_len)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON; a message over :data:`~nlora_serve.errors.MAX_ERROR_CHARS` is cut,
    saying how long it was."""
    param = None if param is None else shown(param)
    return {"error": {"message": capped(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def aborted_body(exc: RequestAborted) -> dict:
    status, code = http_status_of(exc)
    return error_body(str(exc), status, code=code)
