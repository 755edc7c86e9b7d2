"""The front ends over an :class:`~nlora_serve.engine.api.Engine`: gRPC and the OpenAI-compatible
HTTP API in one process and one event loop, sharing keys, admission and metrics (DESIGN §6).
Only ``nlora_serve/cli.py`` imports this package.

gRPC::

    grpc_server.py     NloraServer: both front ends' lifecycle, health, reflection, graceful drain
    grpc_generate.py   the Generation service: Generate (streamed), ListAdapters, GetServerInfo
    grpc_admin.py      the AdapterAdmin service: load, upload, hot-swap N, unload
    grpc_convert.py    proto messages <-> engine types
    grpc_auth.py, grpc_decode.py, grpc_limits.py
                       refusals before a request is parsed (no key, over its size bound, bad protobuf)
    grpc_status.py     expected failures -> gRPC codes and HTTP statuses, one table for both

HTTP::

    http_server.py     uvicorn inside the gRPC server's event loop, body size limit
    http_routes.py     the FastAPI app: routes and error handlers
    http_generate.py   /v1/completions and /v1/chat/completions, whole or SSE-streamed
    http_body.py, http_openai.py
                       the body parsed, validated and turned into engine inputs
    http_responses.py  engine deltas -> OpenAI response objects and SSE chunks
    http_tokenize.py   vLLM's /tokenize and /detokenize
    http_lora_admin.py vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (admin, off by default)
    http_context.py    what the routes serve from; OpenAI's error shape
    token_bytes.py     a token's raw bytes for chat logprobs

Both front ends::

    auth.py            tenants file, API keys, grants (who may use which adapter)
    admission.py       draining, the bounded queue, tenant quotas: a request's place before its prompt
    tokenizer_turns.py the one tokenizer thread, tenants taking turns on it
    chat_template.py   chat messages -> prompt ids, each message's content tokenized as text
    request_policy.py  cache salt and max_tokens rules
    stream.py          an admitted request into the engine, its metered stream back out
    metrics.py         Prometheus metrics (TTFT, ITL, end-to-end, tokens, adapters, rejections)
    server_config.py   ServerConfig, the one dataclass the front ends read

Commands::

    serve_cli.py       ``nlora-serve serve``: builds and runs the server from serve_flags.py's flags,
                       with backend_cli.py (--backend), engine_flags.py (device and size flags) and
                       example_tenants.py (--example-tenants)
    generate_cli.py    ``nlora-serve generate``: one prompt through the engine, no server
    keys_cli.py        ``nlora-serve keys {new,hash}``
"""
