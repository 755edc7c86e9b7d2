"""The OpenAI-compatible HTTP front end (FastAPI under uvicorn, in the gRPC server's event loop),
with vLLM's extras::

    server.py      uvicorn inside the gRPC server's event loop, body size limit
    routes.py      the FastAPI app: routes and error handlers
    context.py     what the routes serve from; OpenAI's error shape
    forwarded.py   the client's address: X-Forwarded-For from a trusted proxy, when it is an IP address
    generate.py    a generation request from admission to answer, whole or SSE-streamed, for
                   each route's Endpoint: openai_route.py (/v1/completions, /v1/chat/completions),
                   responses_route.py (/v1/responses)
  the body, parsed and checked (no I/O)
    body.py        JSON parsed as FastAPI parses it, then validated into a request model; large
                   bodies in pieces, off the event loop (body_json.py, body_pieces.py), counts no
                   request can serve refused first (body_bounds.py), the garbage collector held
                   off while a large body is parsed and the body freed in pieces (body_gc.py)
    request_models.py  the completions and chat bodies as pydantic models
    openai.py      a validated body -> engine inputs (prompts.py: a completion's prompt or batch;
                   structured.py: response_format / structured_outputs; truncation.py:
                   truncate_prompt_tokens; tools.py: tools and tool_choice)
  the answer (no I/O)
    responses.py   engine deltas -> OpenAI response objects and SSE chunks; choices.py: n and
                   prompt batches as one stream; echo.py: echo and prompt_logprobs; token_bytes.py:
                   a token's string and raw bytes, for logprobs
    tool_stream.py, tool_parsers.py
                   streamed tool calls; tool_choice "auto"'s parsers (hermes, llama3_json)
  /v1/responses (OpenAI's Responses API)
    responses_request.py  its request model and checks; responses_chat.py: the chat request it
                   runs as; responses_tools.py: function tools and tool-call items;
                   responses_shape.py: the response objects and stream events
  vLLM's extras
    tokenize.py    /tokenize and /detokenize
    lora_admin.py  /v1/load_lora_adapter and /v1/unload_lora_adapter (admin, off by default)
"""
