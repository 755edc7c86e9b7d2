"""The flags of ``nlora-serve serve`` (its server, store, adapter and --backend flags; the device and
size flags are commands/engine_flags.py's), parsed and range-checked before anything loads;
commands/serve.py builds the server from them (commands/backend.py the engine --backend names).

Nothing here imports torch: ``serve --help`` and a mistyped flag answer in a fraction of a second,
with the defaults read from the config dataclasses themselves (tests/test_cli.py checks both).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from nlora_serve.adapters.limits import DEFAULT_MAX_RANK, AdapterLimits
from nlora_serve.adapters.names import validate_name
from nlora_serve.arg_types import DTYPE_CHOICES, human_readable_int, integer_arg, port_or_off_arg
from nlora_serve.engine.config import SCHEDULING_POLICIES, EngineConfig
from nlora_serve.errors import AdapterError
from nlora_serve.log_format import FORMATS
from nlora_serve.serving.commands.engine_flags import (add_device_arguments, add_generation_config_arguments,
                                                      flag_groups, group_adders)
from nlora_serve.serving.server_config import TOOL_CALL_PARSERS, ServerConfig, env_allows_updating

MiB = 1 << 20
DEFAULT_HTTP_PORT = 8000  # vLLM's: `curl localhost:8000/v1/models` works as a vLLM user expects
BACKENDS = ("native", "vllm")


# serve --help's groups, by concern as vLLM's (its ModelConfig, ParallelConfig, CacheConfig, ...)
SERVE_GROUPS = {
    "model": ("model and loading", "the base model, its weights, dtype and tokenizer, and its sampling defaults"),
    "device": ("engine, device and parallelism", "which engine runs the model, on which device, split how"),
    "cache": ("KV cache", "the attention keys' and values' memory, and prefix caching"),
    "scheduler": ("scheduler", "which requests run each step, and how many tokens"),
    "adapters": ("LoRA adapters", "the adapter store, the adapters registered at start, and their bounds"),
    "tenants": ("tenants and auth", "API keys and grants; without a tenants file, no auth and loopback only"),
    "frontends": ("front ends", "the gRPC and HTTP listeners and their per-request bounds"),
    "tools": ("tool calling", "chat's tool calls read from the model's text"),
    "observability": ("observability", "Prometheus metrics and request logs"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nlora-serve serve``, in ``--help``'s groups (:data:`SERVE_GROUPS`)."""
    d = ServerConfig()
    groups = flag_groups(parser, SERVE_GROUPS)
    m, c, s, a, t, f, u, o = group_adders(parser, groups, "model", "cache", "scheduler", "adapters", "tenants",
                                          "frontends", "tools", "observability")
    f("--host", default=d.host, help="interface to listen on; anything but loopback needs --tenants-file "
                                     "(default: %(default)s)")
    f("--port", type=int, default=d.port, help="gRPC port, 0 = any free one (default: %(default)s)")
    f("--http-port", type=port_or_off_arg, default=DEFAULT_HTTP_PORT,
      help="the OpenAI-compatible HTTP API's port (/v1/completions, /v1/chat/completions, /v1/models, "
           "/metrics), 0 = any free one, 'off' = gRPC only; same keys, grants and queue as gRPC "
           "(default: %(default)s, vLLM's)")
    f("--max-queue", type=int, default=d.max_queue, help="running + waiting requests at most; beyond that "
                                                         "RESOURCE_EXHAUSTED / HTTP 429 (default: %(default)s)")
    f("--max-tokens", type=int, default=d.max_tokens, help="new tokens per request at most: a larger max_tokens "
                                                           "is lowered to it (as vLLM lowers to its generation "
                                                           "config's), and a request without one gets the rest "
                                                           "of the context, at most this (default: %(default)s)")
    f("--drain-seconds", type=float, default=d.drain_seconds,
      help="on SIGTERM/SIGINT, how long running streams may finish; the rest are then aborted, "
           "each told that the server shut down; a second signal ends the drain at once (default: %(default)s)")
    m("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf "
                                         "file, or a Hugging Face ORG/NAME in the HF cache ($HF_HOME) "
                                         "(default: %(default)s)")
    m("--cache-dir", default=argparse.SUPPRESS,
      help="prepared-model cache root (default: $NLORA_SERVE_CACHE, else $XDG_CACHE_HOME/nlora-serve)")
    m("--dtype", choices=DTYPE_CHOICES, default="auto",
      help="compute dtype, in vLLM's spellings: auto = bfloat16 where the CPU or GPU has fast bf16, else float32; "
           "float = float32; half and float16 are refused (no float16 kernels here) (default: %(default)s)")
    m("--served-model-name", default=None, help="the base model's name in /v1/models and the HTTP 'model' field "
                                               "(default: the model's directory or GGUF name, e.g. "
                                               "SmolLM2-135M-Instruct.Q4_1)")
    m("--max-model-len", type=human_readable_int, default=2048,
      help="prompt + output tokens per sequence; as vLLM, 8k = 8000 and 8K = 8192 (default: %(default)s)")
    m("--seed", type=int, default=EngineConfig.__dataclass_fields__["seed"].default,
      help="seeds the sampling of requests that send no seed of their own (a request's seed always gives "
           "the same tokens); vLLM's flag, passed to vLLM on --backend vllm (default: %(default)s)")
    c("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
      help="share the KV blocks of equal prompt prefixes between requests on the same adapter version "
           "with the same cache_salt (and, with --tenants-file, of the same tenant only); "
           "--no-enable-prefix-caching computes every prompt whole (default: on)")
    s("--scheduling-policy", choices=SCHEDULING_POLICIES, default=None,
      help="admission order: fcfs (arrival) or fair (the tenant with the least service first, VTC, "
           "with per-tenant shares of --max-queue; the native engine only: --backend vllm schedules fcfs, "
           "keeping the shares) (default: fair with --tenants-file, else fcfs)")
    a("--adapter-dir", default="./nlora-adapters",
      help="adapter store, a folder (created if missing) that keeps every registration, upload and swap; "
           "at start each adapter's newest version there is served again (default: %(default)s)")
    a("--adapter", action="append", default=[], metavar="NAME=DIR", type=_named_dir,
      help="register the adapter directory DIR (or a Hugging Face ORG/ADAPTER in the HF cache) as NAME at "
           "start when NAME is not in the store yet (repeatable), e.g. --adapter lower=examples/tenants/lower")
    a("--example-tenants", type=int, default=0, metavar="N",
      help="register N example tied IntTune tenants (tenant-000...) at start when missing (default: 0)")
    a("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="refuse adapters above this rank (default: %(default)s)")
    a("--max-loras", type=int, default=AdapterLimits().max_loras,
      help="untied adapters resident at once, LRU beyond (a request finding every slot held waits for one, "
           "as in vLLM); on --backend vllm, vLLM's max_loras: distinct "
           "adapters in one batch, tied tenants included, and on the CPU the zero LoRA base requests run on "
           "(default: %(default)s)")
    a("--adapter-memory", type=int, default=None,  # None: serve --backend vllm refuses it only when given
      help=f"MiB all tied tenants' N may use (default: {AdapterLimits().adapter_memory // MiB})")
    a("--max-adapter-bytes", type=int, default=d.max_adapter_bytes,
      help="largest upload (config + safetensors) or swap payload in bytes, and largest adapter version "
           "the adapter store writes or reads back (default: %(default)s)")
    a("--keep-versions", type=integer_arg(1), default=None, metavar="N",
      help="versions of each adapter kept in the store, the current one included: 1 deletes an older version "
           "once no request runs on it; more keeps the older ones to roll back to (`adapters versions NAME` "
           "lists them; live: `adapters load --name NAME --version V`; server stopped: `adapters rollback NAME "
           "--to V`; each costs its files' disk space); the store records N: a later start without the flag keeps "
           "the same, only a smaller N deletes kept versions (default: the store's record, 1 for a new store)")
    a("--allow-runtime-lora-updating", action=argparse.BooleanOptionalAction, default=env_allows_updating(),
      help="serve vLLM's POST /v1/load_lora_adapter {lora_name, lora_path} (a folder on this server's disk) and "
           "/v1/unload_lora_adapter over HTTP, admin keys only (default: off, on where "
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1 or true, as vLLM)")
    t("--tenants-file", default=None, help="JSON/TOML file of tenant and admin key hashes and grants, re-read on "
                                           "SIGHUP (kill -HUP PID; the ready message prints the command); "
                                           "without it there is no auth and the server binds to loopback only")
    u("--enable-auto-tool-choice", action="store_true",
      help="serve chat's and /v1/responses' tool_choice \"auto\" (the default with tools): the model's own "
           "tool-call text is read by --tool-call-parser's parser; without it \"auto\" is refused on chat, "
           "as vLLM's (default: off)")
    u("--tool-call-parser", type=_tool_call_parser, default=None, metavar="{" + ",".join(TOOL_CALL_PARSERS) + "}",
      help="the model's tool-call format, for --enable-auto-tool-choice (vLLM's names): hermes = "
           "<tool_call>{\"name\", \"arguments\"}</tool_call> (Hermes, Qwen2.5, Qwen3); llama3_json = "
           "{\"name\", \"parameters\"} objects, <|python_tag|> optional (Llama 3.1/3.2/3.3) (default: none)")
    o("--metrics-port", type=int, default=None, help="also serve Prometheus /metrics on this port, for gRPC-only "
                                                     "servers (--http-port serves /metrics already) (default: off)")
    o("--tenant-metrics", action="store_true", help="per-tenant counters in /metrics (default: off)")
    o("--enable-log-requests", action="store_true",
      help="log one INFO line per generation request (gRPC and HTTP) when it ends: its id, front end, tenant "
           "name and key id (its sha256's first 8 hex digits, never the key), adapter and version, prompt and "
           "output tokens, TTFT and total ms, outcome; and "
           "one per request refused, with the reason and the client's address, at most 10 at once then 2/s per "
           "reason (the rest counted in a 'suppressed K refusal lines' line) (default: off, as vLLM's)")
    o("--log-format", choices=FORMATS, default="text",
      help="text: one line per record, 'TIME LEVEL LOGGER: MESSAGE'; json: one JSON object per line (time, "
           "level, logger, message, and the request log's and admin lines' values as keys; uvicorn's and "
           "gRPC's records too), for a log pipeline (default: %(default)s)")
    o("--max-log-len", type=integer_arg(0), default=0,
      help="with --enable-log-requests, also log the first N characters of each request's prompt and output "
           "(quoted and escaped); tenants' text then sits in the server's log: mind who reads it and how long it "
           "is kept. 0 logs no text (default: %(default)s; vLLM's default logs it whole)")
    add_generation_config_arguments(groups["model"], "a request's unset sampling fields", "every request")
    add_backend_arguments(parser, groups)
    add_device_arguments(parser, groups)


def _tool_call_parser(value: str) -> str:
    if value not in TOOL_CALL_PARSERS:
        raise argparse.ArgumentTypeError(f"invalid tool call parser: {value!r} (known here: "
                                          f"{', '.join(TOOL_CALL_PARSERS)})")
    return value


def _named_dir(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}{_named_dir_hint(value)}")
    try:  # at parse time: it was refused only once the model had loaded, without naming the flag
        validate_name(name)
    except AdapterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, folder


def _named_dir_hint(value: str) -> str:
    """What to type for an --adapter value without NAME= (h117): a folder alone, as vLLM's
    ``--lora-modules`` JSON form or a path, gets ``NAME=`` from its last part where that is a valid
    name."""
    if value.lstrip().startswith("{"):
        return " (vLLM's JSON form of --lora-modules is not taken: give --adapter NAME=DIR)"
    stem = value.rstrip("/").rsplit("/", 1)[-1]
    try:
        validate_name(stem)
    except AdapterError:
        return ""
    return f"; to serve that folder as {stem!r}: --adapter {stem}={value}"


def add_backend_arguments(parser: argparse.ArgumentParser, groups: Mapping[str, object] | None = None) -> None:
    """Flags that choose and configure the engine (in ``groups``' "device" group where given, its
    --max-fold-folders in "adapters")."""
    a, ad = group_adders(parser, groups, "device", "adapters")
    a("--backend", choices=BACKENDS, default="native",
      help="engine: native (ours: tied tenants cost r² per site) or vllm (vLLM's AsyncLLM with its tensor/"
           "pipeline parallelism; every adapter is folded to a full plain LoRA, so tied tenants lose their "
           "memory advantage there) (default: %(default)s)")
    a("--tensor-parallel-size", type=int, default=1, help="--backend vllm: GPUs each layer is split over (default: 1)")
    a("--pipeline-parallel-size", type=int, default=1,
      help="--backend vllm: pipeline stages the layers are split into, e.g. one per node (default: 1)")
    ad("--max-fold-folders", type=int, default=None, metavar="N",
      help="--backend vllm: folded adapter folders on disk at most; each version is folded on its first "
           "request and again after its folder went, and a request whose version needs one more waits, "
           "counted as waiting, until an idle one has gone (default: 4 x vLLM's max_cpu_loras)")
    a("--vllm-arg", action="append", default=[], metavar="KEY=VALUE", type=_engine_arg,
      help="--backend vllm: any other vLLM engine argument (an AsyncEngineArgs field), VALUE read as JSON "
           "when it parses, else as a string; repeatable, e.g. --vllm-arg enforce_eager=false "
           "--vllm-arg distributed_executor_backend=ray")


def _engine_arg(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an engine argument name, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
