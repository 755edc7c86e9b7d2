"""The front ends over an :class:`~nlora_serve.engine.api.Engine`: gRPC and the OpenAI-compatible
HTTP API in one process and one event loop, sharing keys, admission and metrics (DESIGN §6), and
the commands that start them. Only ``nlora_serve/cli.py`` imports this package.

The folders::

    grpc_api/     the gRPC services (Generation, AdapterAdmin) and what guards them
    http_api/     the OpenAI-compatible HTTP API (FastAPI), with vLLM's extras
    commands/     ``nlora-serve serve``, ``generate`` and ``keys``: flags in, a server or an answer out

Both front ends, here::

    server.py          NloraServer: both front ends' lifecycle, health, reflection, graceful drain
    status.py          expected failures -> gRPC codes and HTTP statuses, one table for both
    auth.py            API keys and grants: who is calling, may they use this adapter
    tenants_file.py    the tenants file: its format, checked entry by entry into auth.py's principals
    tenants_reload.py  the tenants file re-read on SIGHUP, checked whole before anything changes
    admin_log.py       log lines of refused admin calls (both front ends), beside each change's line
    admission.py       draining, the bounded queue, tenant quotas: a request's place before its prompt
    tokenizer_turns.py the one tokenizer thread, tenants taking turns on it
    chat_template.py   chat messages -> prompt ids, each message's content tokenized as text
    request_policy.py  cache salt and max_tokens rules
    generation_config.py  --generation-config: a request's sampling defaults from the model's folder
    stream.py          an admitted request into the engine, its metered stream back out
    metrics.py         Prometheus metrics (TTFT, ITL, end-to-end, tokens, adapters, rejections; per tenant opt-in)
    metrics_scrape.py  GET /metrics on the API port, rendered off the event loop, shared by overlapping scrapes
    metrics_http.py    --metrics-port: /metrics and /health on a port of their own, each request under a deadline
    health_state.py    what GET /health answers: ok, draining or dead
    request_log.py     --enable-log-requests: one line per request's end or refusal (text or JSON)
    log_limit.py       refusal lines rate-limited per reason, as the kernel's printk
    server_config.py   ServerConfig, the one dataclass the front ends read

Imports go one way: ``commands`` imports ``server``; ``server`` imports ``grpc_api`` and
``http_api``; those two import the shared modules above and never each other.
"""
