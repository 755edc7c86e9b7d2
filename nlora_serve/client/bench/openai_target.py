"""OpenAI-compatible HTTP target: streamed ``/v1/completions`` or ``/v1/chat/completions``.

Works against our ``serve --http-port`` and vLLM's OpenAI server alike: ``model`` is the tenant
(the base model's served name for base requests), ``stream: true`` with
``stream_options.include_usage`` so the last chunk carries the token counts, and ``ignore_eos``
(a vLLM extension) so outputs have the asked length. Timings follow vLLM ``benchmarks/serve``:
TTFT at the first chunk with non-empty text, one ITL sample per later such chunk.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping

import httpx2

from nlora_serve.client.bench.targets import RequestResult
from nlora_serve.client.bench.workload import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` payloads of a text/event-stream, one per event (multi-line data joined with
    newlines, comments and other fields skipped), per the WHATWG server-sent events format."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def error_code(status: int | str | None, fallback: str) -> str:
    """"HTTP 429" for a numeric status or code, the code itself for a string one."""
    if isinstance(status, int) or (isinstance(status, str) and status.isdigit()):
        return f"HTTP {int(status)}"
    return status or fallback


def port_hint(exc: httpx2.HTTPError, base_url: str) -> str:
    """What to do when the server's reply is no HTTP/1.x response: h11 says "illegal request line"
    (or status line) of a reply in binary, as a gRPC port (HTTP/2 only) answers; "" for other errors."""
    if isinstance(exc, httpx2.RemoteProtocolError) and str(exc).startswith("illegal"):
        return (f"; {base_url} answered in no HTTP/1.1: is it nlora-serve's gRPC port (serve --port, 50051 by "
                "default)? --base-url takes the OpenAI HTTP port (serve --http-port, 8000 by default); "
                "--target grpc --server HOST:PORT benches the gRPC port")
    return ""


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {})
        return error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")


def refusal_code(status: int, body: bytes) -> str:
    """A refused request's error code: "HTTP <status>", then the error object's ``code`` where it is
    a word (ours: the rejection reason, so a 429 reads "HTTP 429 queue_full" or "HTTP 429
    tenant_quota"; OpenAI's "rate_limit_exceeded"); vLLM's numeric code repeats the status and is left out."""
    try:
        error = json.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        code = None
    if isinstance(code, str) and code and not code.isdigit() and code.isprintable():
        return f"HTTP {status} {code[:64]}"
    return f"HTTP {status}"


class OpenAITarget:
    """Any OpenAI-compatible server at ``base_url`` (scheme://host:port; a trailing /v1 is dropped).

    Args:
        endpoint: "completions" or "chat".
        base_model: the ``model`` sent for requests without a tenant; None = the entry of
            ``GET /v1/models`` without a ``parent`` (how ours and vLLM list the base model), when
            there is exactly one.
        detokenize: token ids -> text; needed for synthetic prompts on "chat" (else ids are sent
            as the completions ``prompt``, which vLLM accepts).
        timeout: seconds per request (None = none).
        keys: tenant -> API key, sent by that tenant's requests instead of ``api_key`` (bench/keys.py).

    Error codes: "HTTP <status>" for a refused request (and the error object's code, where a word:
    "HTTP 429 queue_full"), the error object's code (or "HTTP <code>")
    for an error event inside the stream, the exception name for a transport failure.
    """

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None, endpoint: str = "completions",
                 base_model: str | None = None, ignore_eos: bool = True, temperature: float = 0.0,
                 detokenize: Callable[[list[int]], str] | None = None, timeout: float | None = None,
                 keys: Mapping[str, str] | None = None):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}; got {endpoint!r}")
        # the openai SDK's base_url ends in /v1 (the README's example): taken too, not sent as /v1/v1/...
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.path, self.base_model = ENDPOINTS[endpoint], base_model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tenant_headers = {tenant: {"Authorization": f"Bearer {key}"} for tenant, key in (keys or {}).items()}
        self.chat, self.ignore_eos, self.temperature = endpoint == "chat", ignore_eos, temperature
        self.detokenize, self.timeout = detokenize, timeout
        self.http: httpx2.AsyncClient | None = None
        self.models_error = "no entry without a parent in GET /v1/models"  # why the base model is unknown

    async def __aenter__(self) -> OpenAITarget:
        self.http = httpx2.AsyncClient(base_url=self.base_url, headers=self.headers,
                                       timeout=httpx2.Timeout(self.timeout),
                                       limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64))
        if self.base_model is None:
            self.base_model = await self._listed_base_model()
        return self

    async def _listed_base_model(self) -> str | None:
        """The base model's served name from ``GET /v1/models`` (None when it cannot be told, and
        ``models_error`` says why: an unreachable server or a refused key is named as such)."""
        url = f"{self.base_url}/v1/models"
        try:
            resp = await self.http.get("/v1/models")
            if resp.status_code != 200:
                self.models_error = f"GET {url} answered HTTP {resp.status_code}: {_error_message(resp.content)}"
                return None
            models = resp.json()["data"]
        except httpx2.HTTPError as exc:
            self.models_error = f"GET {url} failed: {type(exc).__name__}: {exc}{port_hint(exc, self.base_url)}"
            return None
        except (ValueError, KeyError, TypeError):
            self.models_error = f"GET {url} is not an OpenAI model list"
            return None
        parentless = [m["id"] for m in models if isinstance(m, dict) and not m.get("parent")]
        if len(parentless) > 1:  # ours lists a key's adapters without parents when it may not use the base
            shown = ", ".join(map(str, parentless[:4])) + (", ..." if len(parentless) > 4 else "")
            self.models_error = (f"GET {url} lists {len(parentless)} entries without a parent ({shown}), so which "
                                 "is the base model cannot be told; a key not granted the base model sees only "
                                 "its adapters so")
            return None
        return parentless[0] if parentless else None

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    def body(self, req: BenchRequest) -> dict:
        """The JSON request body of ``req``.

        Raises:
            ValueError: a token-id prompt for the chat endpoint without ``detokenize``, or a base-model
                request when the base model's name is unknown.
        """
        if req.tenant is None and self.base_model is None:
            raise ValueError(f"the base model's name is unknown ({self.models_error}): check --base-url and "
                             "--api-key, or give --base-model")
        prompt = req.prompt
        if not isinstance(prompt, str) and (self.chat or self.detokenize):
            if self.detokenize is None:
                raise ValueError("the chat endpoint needs text prompts: give a tokenizer or a text prompt file")
            prompt = self.detokenize(list(prompt))
        body = {"model": req.tenant or self.base_model, "max_tokens": req.output_len, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": self.temperature, "seed": req.seed}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        return body

    async def send(self, req: BenchRequest, run_start: float) -> RequestResult:
        res = RequestResult(req.index, req.tenant, time.perf_counter() - run_start)
        body = self.body(req)
        t0 = time.perf_counter()
        try:
            async with self.http.stream("POST", self.path, json=body,
                                        headers=self.tenant_headers.get(req.tenant)) as resp:
                if resp.status_code >= 400:
                    body = await resp.aread()
                    res.fail(refusal_code(resp.status_code, body), _error_message(body))
                else:
                    await self._read(resp, res, t0)
        except httpx2.HTTPError as exc:
            res.fail(type(exc).__name__, (str(exc) or type(exc).__name__) + port_hint(exc, self.base_url))
        res.e2e_s = time.perf_counter() - t0
        return res

    async def _read(self, resp: httpx2.Response, res: RequestResult, t0: float) -> None:
        chunks, usage = 0, None
        async for data in sse_data(resp.aiter_lines()):
            if data.strip() == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                res.fail(error_code(err.get("code") or err.get("type"), "stream_error"), err.get("message", ""))
                return
            for choice in event.get("choices") or []:
                text = choice.get("delta", {}).get("content") if self.chat else choice.get("text")
                if text:
                    res.chunk(t0)
                    chunks += 1
            usage = event.get("usage") or usage
        res.prompt_tokens = (usage or {}).get("prompt_tokens", 0)
        res.output_tokens = (usage or {}).get("completion_tokens", chunks)
