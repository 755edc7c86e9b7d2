"""Front-end (gRPC, OpenAI-compatible HTTP) configuration: one slotted dataclass, validated in
``__post_init__`` (DESIGN §6).

The ``serve`` CLI and the tests only fill it in; the server reads nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nlora_serve.adapters.store import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.errors import AdapterError, NloraError
from nlora_serve.serving.generation_config import SamplingDefaults

LOOPBACK_NAMES = ("localhost",)
MESSAGE_HEADROOM = 1 << 20  # bytes a message may carry beyond its payload (name, framing)
MAX_GRPC_MESSAGE = (1 << 31) - 1  # gRPC's message-size options are int32
# "auto" tool choice's parsers (http_api/tool_parsers.py), vLLM's --tool-call-parser names
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
ENV_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for /v1/load_lora_adapter (http_api/lora_admin.py)


class StartupError(NloraError):
    """The server cannot start as asked: a flag out of range or an address that cannot be bound.

    The message names the flag (``--max-queue``) or the ``host:port``.
    """


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_allows_updating() -> bool:
    """vLLM's environment switch, read as vLLM reads it: ``1`` or ``true`` (any case) turns it on
    (``serve --allow-runtime-lora-updating``'s default)."""
    return os.environ.get(ENV_FLAG, "0").strip().lower() in ("1", "true")


def default_served_name(model_dir: Path) -> str:
    """The base model's served name: its directory's name, without the ``-<12 hex>`` key that the
    model cache appends to converted GGUF files (``SmolLM2-135M-Instruct.Q4_1`` for the default)."""
    return re.sub(r"-[0-9a-f]{12}$", "", model_dir.name)


@dataclass(slots=True)
class ServerConfig:
    """Where the server listens and what it admits.

    Raises (in ``__post_init__``):
        ValueError: a field out of range (the message names it and its value), or a non-loopback
            ``host`` without a tenants file: without auth the server must not be reachable from
            other machines (DESIGN §6).
    """

    host: str = "127.0.0.1"  # interface to bind; non-loopback needs ``tenants_file``
    port: int = 50051  # gRPC port; 0 picks a free one (see NloraServer.port)
    metrics_port: int | None = None  # Prometheus HTTP port on ``host``; None = no endpoint, 0 = any free
    # the per-tenant counters (serving/metrics.py): a series per tenant, so off unless asked (DESIGN §6)
    tenant_metrics: bool = False
    # one INFO line per generation request's end or refusal (serving/request_log.py), as vLLM's
    # --enable-log-requests; with max_log_len > 0 the first that many characters of its prompt and
    # output too (tenants' text in the operator's log: off unless asked)
    enable_log_requests: bool = False
    max_log_len: int = 0
    http_port: int | None = None  # OpenAI-compatible HTTP API port on ``host``; None = off, 0 = any free
    tenants_file: str | None = None  # auth file (JSON or TOML); None = no auth, loopback only
    max_queue: int = 256  # running + waiting requests (gRPC and HTTP) at most; beyond: RESOURCE_EXHAUSTED / 429
    # each tenant may hold only its share of the free queue (admission.Admission); on with fair scheduling
    tenant_queue_shares: bool = False
    # a request's max_tokens at most (more is lowered to it, silently); one that sends none gets the rest of
    # the context (max_model_len - prompt tokens, as vLLM), at most this
    max_tokens: int = 2048
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES  # an upload (config + safetensors) or a swap payload, bytes
    drain_seconds: float = 30.0  # graceful shutdown: how long running streams may finish
    # the base model's name in GetServerInfo, /v1/models and HTTP ``model``; None: the model's own
    # (see :func:`default_served_name`)
    served_model_name: str | None = None
    # vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (http_api/lora_admin.py), admin keys
    # only: off by default, as vLLM's, since lora_path reads a folder of the server's own disk
    allow_runtime_lora_updating: bool = False
    # tool_choice "auto" (vLLM's --enable-auto-tool-choice, needing --tool-call-parser): the model's
    # tool-call text read by this parser (one of TOOL_CALL_PARSERS); without it "auto" is refused
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # a request's unset sampling fields: the model's generation_config.json, --override-generation-config
    # (serving/generation_config.py); empty: the API's own defaults
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_tokens", "max_adapter_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServerConfig.{name} must be a positive integer; got {value!r}")
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 65535):
                raise ValueError(f"ServerConfig.{name} must be a port number in [0, 65535]; got {value!r}")
        ports = [(name, getattr(self, name)) for name in ("port", "http_port", "metrics_port")]
        for i, (name, value) in enumerate(ports):
            for other, other_value in ports[i + 1:]:
                if value and value == other_value:
                    raise ValueError(f"ServerConfig.{name} and ServerConfig.{other} are both {value}: each "
                                     "endpoint needs its own port")
        if not isinstance(self.max_log_len, int) or isinstance(self.max_log_len, bool) or self.max_log_len < 0:
            raise ValueError(f"ServerConfig.max_log_len must be an integer >= 0; got {self.max_log_len!r}")
        if self.max_log_len and not self.enable_log_requests:
            raise ValueError(f"ServerConfig.max_log_len={self.max_log_len} logs request text only with "
                             "ServerConfig.enable_log_requests on: give both, or neither")
        if not self.drain_seconds >= 0:
            raise ValueError(f"ServerConfig.drain_seconds must be >= 0; got {self.drain_seconds!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("ServerConfig.served_model_name must not be empty")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"ServerConfig.tool_call_parser={self.tool_call_parser!r} is not a tool call parser "
                             f"here; known: {', '.join(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("ServerConfig.enable_auto_tool_choice requires ServerConfig.tool_call_parser")
        if self.tenants_file is None and not is_loopback(self.host):
            raise ValueError(f"ServerConfig.host={self.host!r} is not a loopback address and no tenants "
                             "file is configured: without auth the server binds only to 127.0.0.1 "
                             "(give --tenants-file to listen on other interfaces)")

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser of tool_choice "auto"; None where "auto" is refused."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    def check_adapter_name(self, name: str) -> None:
        """Refuse an adapter name equal to the served base model name: HTTP's ``model`` field would
        always resolve it to the base model, so the adapter could never be reached; also one that
        differs from it only in case (one folder on a case-insensitive file system, and a name a
        client could not tell apart from the base model's). Call it wherever
        a name enters the server (startup's --adapter and store names, LoadAdapter, UploadAdapter),
        with ``served_model_name`` resolved (NloraServer and the serve CLI resolve it).

        Raises:
            AdapterError: the name is the served model name, or that name in another case (the
                message names both and the fix).
        """
        served = self.served_model_name
        if served is not None and name != served and name.casefold() == served.casefold():
            raise AdapterError(f"adapter name {name!r} differs only in case from the served base model name "
                               f"{served!r} (--served-model-name): a client could not tell them apart; register "
                               "it under another name")
        if name == served:
            raise AdapterError(f"adapter name {name!r} is the served base model name (--served-model-name): "
                               f"an HTTP request for model {name!r} runs the base model, so this adapter could "
                               "never be reached; register it under another name or serve the base model under "
                               "another --served-model-name")

    @property
    def address(self) -> str:
        """``host:port`` for grpc's ``add_insecure_port`` (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        """gRPC's max send message length, bytes: ``max_adapter_bytes`` plus headroom. The receive
        limit is sized where the server is built, from the model and ``--max-rank`` (a legal swap
        payload; grpc_api/limits.py message_limits); the swap payload it admits is never above this."""
        return min(self.max_adapter_bytes + MESSAGE_HEADROOM, MAX_GRPC_MESSAGE)
