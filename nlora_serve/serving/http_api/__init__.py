"""The OpenAI-compatible HTTP front end (FastAPI under uvicorn, in the gRPC server's event loop),
with vLLM's extras::

    server.py      uvicorn inside the gRPC server's event loop, body size limit
    routes.py      the FastAPI app: routes and error handlers
    generate.py    a generation request from admission to answer, whole or SSE-streamed, for
                   each route's Endpoint: openai_route.py (/v1/completions, /v1/chat/completions),
                   responses_route.py (/v1/responses; responses_request.py, responses_shape.py)
    body.py, openai.py
                   the body parsed, validated and turned into engine inputs
    responses.py   engine deltas -> OpenAI response objects and SSE chunks
    token_bytes.py a token's string (decoded once per server) and raw bytes, for logprobs
    tokenize.py    vLLM's /tokenize and /detokenize
    lora_admin.py  vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (admin, off by default)
    context.py     what the routes serve from; OpenAI's error shape
"""
