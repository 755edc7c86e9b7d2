"""Engine outputs -> OpenAI API response objects, for the HTTP front end (no I/O).

One :class:`Shaper` per request turns the engine's deltas into either the whole response
(``text_completion`` / ``chat.completion``) or Server-Sent-Events chunks (``text_completion`` /
``chat.completion.chunk``), with OpenAI's logprobs layouts and, on every choice, vLLM's
``stop_reason`` (the stop string or stop token id that ended the request, else null; in a chat
stream on a choice's finishing chunk only), and, on every object, the adapter version that answered
as OpenAI's ``system_fingerprint`` (:func:`fingerprint`; the same version also goes out as
response headers, :func:`version_headers`).

Each object has the keys vLLM 0.32's has, as its ``model_dump()`` (whole) or
``model_dump_json(exclude_unset=True)`` (chunks) writes them: the vLLM fields this server never
fills go out null (:data:`MESSAGE_NULLS`, ..., usage's ``completion_tokens_details`` where vLLM's
has it), a chat stream's content deltas are ``{"content": text}``, ``""`` included, and a chunk carries ``usage`` only with
``continuous_usage_stats`` or as the closing usage chunk. Deliberately not as vLLM: the
``system_fingerprint`` (vLLM's: one per server, on the last chunk only) and ``usage``'s
``prompt_tokens_details.cached_tokens`` (vLLM's with ``--enable-prompt-tokens-details``).

- completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (parallel lists;
  a token's ``top_logprobs`` holds the token itself and the ``logprobs`` most likely, so up to
  ``logprobs`` + 1 entries, as OpenAI documents and vLLM 0.32 returns: echo.py's ``with_token``);
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.

A token's string is its own decoding (``tokenizer.decode([id])``), but for a byte-level token that
ends inside a multi-byte character: "" until a token completes it, which has the whole character,
as vLLM 0.32 decodes it after up to 4 tokens before it (token_bytes.py's ``TokenText.in_context``;
so ``text_offset`` indexes the text), or ``"token_id:<id>"`` with
``return_tokens_as_token_ids``. A chat entry's ``bytes`` are the token's raw bytes either way
(:mod:`~nlora_serve.serving.http_api.token_bytes`), so the bytes of a text's tokens join to its UTF-8.
"""

from __future__ import annotations

import functools
import json
import time

from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.http_api.echo import Echo, clamp, echo_logprobs, vllm_prompt_logprobs, with_token
from nlora_serve.serving.http_api.token_bytes import TokenBytes, TokenText
from nlora_serve.serving.http_api.tool_parsers import AutoStream, auto_answer
from nlora_serve.serving.http_api.tool_stream import NamedStream, RequiredStream
from nlora_serve.serving.http_api.tools import ToolCalls, whole_calls


# vLLM 0.32's response fields this server never fills, sent null as vLLM's ``model_dump()`` sends them:
# an OpenAI SDK client reads an extra field that is absent as an AttributeError, a null one as None
MESSAGE_NULLS = {"refusal": None, "annotations": None, "audio": None, "function_call": None}  # chat message
WHOLE_NULLS = {"service_tier": None}  # a whole response, before its usage
TRANSFER_NULLS = {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}  # ... its last fields

# Starlette's JSONResponse.render: the bytes a whole response goes out as
_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def whole_json(body: dict) -> bytes:
    """A whole response ``body`` as Starlette's JSONResponse renders it (the same bytes), each item
    of its top-level lists (``choices``; /v1/responses' ``output`` and ``tools``) serialized on its
    own: ``json.dumps`` holds the GIL for all it serializes, and a batch's response with
    ``prompt_logprobs`` runs to hundreds of MB (a response echoing 100k tools: 4 MB, ~0.18 s in one
    call), so a thread serializing it one item at a time lets the event loop run in between.

    Raises:
        ValueError: a NaN or infinite float (JSON has none), as JSONResponse raises.
    """
    fields = (f"{_dumps(key)}:" + ("[" + ",".join(map(_dumps, value)) + "]" if type(value) is list else _dumps(value))
              for key, value in body.items())
    return ("{" + ",".join(fields) + "}").encode()


def sse(payload: dict | str) -> str:
    """One Server-Sent-Events message (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def fingerprint(out: RequestOutput) -> str | None:
    """OpenAI's ``system_fingerprint`` of a request: the adapter version it runs on,
    ``"<adapter>:v<version>:<first 12 hex of its content hash>"`` (e.g. ``"lower:v3:1a2b3c4d5e6f"``),
    None (JSON null) on the base model, which cannot change while the server runs.

    OpenAI defines the field as the backend configuration that answered, to be compared across
    requests to tell when a change may have changed the output; a hot-swapped N is such a change.
    vLLM sends ``vllm-<version>-<config hash>``, one per server, which cannot tell adapter
    versions apart. Every OpenAI client types it as an optional string.
    """
    if out.adapter is None:
        return None
    return f"{out.adapter}:v{out.adapter_version}:{out.adapter_hash[:12]}"


def version_headers(out: RequestOutput) -> dict[str, str]:
    """Response headers naming the adapter version a request runs on (pinned at admission, so the
    first delta, known before the headers go out, names it for a whole stream):
    ``X-Adapter-Version`` (the version number, ``0`` on the base model, as gRPC's
    ``AdapterRef.version``) and, on an adapter, ``X-Adapter-Hash`` (sha256 hex of its content)."""
    headers = {"X-Adapter-Version": str(out.adapter_version)}
    if out.adapter is not None:
        headers["X-Adapter-Hash"] = out.adapter_hash
    return headers


def usage(out: RequestOutput, completion_tokens: int | None = None) -> dict:
    """OpenAI usage of a request so far (finished: the whole), with the prompt tokens read from the
    prefix cache; ``completion_tokens`` overrides ``out``'s count (0 before the first token)."""
    made = out.completion_tokens if completion_tokens is None else completion_tokens
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": made, "total_tokens": out.prompt_tokens + made,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def total_usage(lasts: list[RequestOutput], n: int = 1) -> dict:
    """OpenAI usage of a request's choices (the latest delta of each, by index: ``n`` per prompt),
    as vLLM 0.32 counts ``n`` > 1 and a batch of prompts: each prompt once, the completion tokens
    of every choice. The cached prompt tokens are those of each prompt's choice 0 (the others read
    the prompt it wrote to the cache), summed over the prompts (vLLM gives one prompt's: the
    first's in a stream, the last's in a whole response)."""
    firsts = lasts[::n]
    made = sum(out.completion_tokens for out in lasts)
    prompt, cached = sum(out.prompt_tokens for out in firsts), sum(out.cached_tokens for out in firsts)
    return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made,
            "prompt_tokens_details": {"cached_tokens": cached}}


def tool_stream(tools: ToolCalls) -> NamedStream | RequiredStream | AutoStream:
    """A choice's streamed tool calls: a named function's, "required"'s, "auto"'s parser's."""
    if tools.parser is not None:
        return AutoStream(tools.parser, tools.parallel)
    return NamedStream(tools.name) if tools.name else RequiredStream()


class Shaper:
    """Response objects of one request.

    Args:
        request_id: the response ``id`` (``cmpl-...`` / ``chatcmpl-...``).
        model: the ``model`` the client asked for (echoed).
        chat: chat completion (True) or text completion (False).
        tokenizer: decodes single tokens for logprobs.
        top_logprobs: logprobs asked (top-k per token, 0 = the sampled token only); None = off.
        token_ids_as_tokens: logprob tokens as ``"token_id:<id>"`` (vLLM's return_tokens_as_token_ids).
        logprob_token_ids: the request sent vLLM's ``logprob_token_ids``: a generated token's
            ``top_logprobs`` are all its engine entry holds (the token, then the ids), in that order.
        include_usage: streaming: end with a usage chunk (stream_options.include_usage).
        continuous_usage: with include_usage, every chunk carries the usage so far instead of null
            (vLLM's stream_options.continuous_usage_stats; of the chunk's own choice, as vLLM).
        n: the choices of each prompt; each delta's ``index`` says whose it is (prompt ``index // n``).
        prompt_ids: per prompt (a completions batch holds several) its tokens as the engine runs
            them (for echo and prompt_logprobs); None: one prompt, neither asked.
        echo: completions with ``echo=true``: per prompt what goes before each of its ``n`` choices
            (http_api/echo.py).
        prompt_logprobs: the top-k per prompt token the prompt was scored to (vLLM's
            ``prompt_logprobs``, else echo's ``logprobs``: openai.py's ``scored_prompt_logprobs``),
            returned as vLLM's ``prompt_logprobs``; None = not returned.
        token_text: the server's :class:`TokenText` of ``tokenizer`` (each token decoded once per
            server); None: one of this request's own.
        tools: chat: the output returns as tool calls (http_api/tools.py; "auto": those its parser
            finds, http_api/tool_parsers.py); None: as content.
        token_ids: vLLM's return_token_ids: each choice's ``token_ids`` (a chunk's: its own) and the
            prompt's ``prompt_token_ids`` (chat: on the response, in a stream on the role chunks;
            completions: on each choice, in a stream on its first chunk, which with echo carries them
            anyway, as vLLM's); without it both are null, as vLLM sends them.
    """

    def __init__(self, request_id: str, model: str, chat: bool, tokenizer, top_logprobs: int | None,
                 token_ids_as_tokens: bool = False, include_usage: bool = False, continuous_usage: bool = False,
                 n: int = 1, prompt_ids: list[list[int]] | None = None, echo: list[Echo] | None = None,
                 prompt_logprobs: int | None = None, token_text: TokenText | None = None,
                 tools: ToolCalls | None = None, token_ids: bool = False, logprob_token_ids: bool = False):
        self.request_id, self.model, self.chat = request_id, model, chat
        self.tokenizer, self.top_logprobs = tokenizer, top_logprobs
        self.logprob_token_ids = logprob_token_ids
        self._text = TokenText(tokenizer) if token_text is None else token_text
        self.token_ids_as_tokens, self.include_usage = token_ids_as_tokens, include_usage
        self.continuous_usage = include_usage and continuous_usage
        self.created = int(time.time())
        self.n = n
        choices = n * (1 if prompt_ids is None else len(prompt_ids))
        self._offsets = [0] * choices  # per choice: characters of text before its next token (text_offset)
        self._context: list[list[int]] = [[] for _ in range(choices)]  # per choice: its last 4 tokens
        self._lasts: list[RequestOutput | None] = [None] * choices  # per choice: its latest delta (the usage chunk)
        self._token_bytes: TokenBytes | None = None  # built on the first chat logprobs entry
        self.prompt_ids, self.echo, self.prompt_logprobs = prompt_ids, echo, prompt_logprobs
        # streaming with echo: the choices whose prompt has not gone out yet (it goes in their first chunk)
        self._echo_unsent = set(range(choices)) if echo is not None else set()
        self.tools = tools
        self.token_ids = token_ids
        # completions' streams: the choices whose first chunk, which carries the prompt's ids with
        # return_token_ids or echo (vLLM's completion_stream_generator), has not gone out yet
        self._prompt_unsent = set(range(choices)) if (token_ids or echo is not None) and not chat else set()
        # streaming tool calls: per choice its calls' deltas (http_api/tool_stream.py)
        self._calls = None if tools is None else [tool_stream(tools) for _ in range(choices)]

    # -- whole responses -----------------------------------------------------------------------

    def whole(self, outs: list[RequestOutput]) -> dict:
        """The non-streaming response of a request's deltas (each choice's last one finished)."""
        by_choice: list[list[RequestOutput]] = [[] for _ in self._lasts]
        for out in outs:
            by_choice[out.index].append(out)
        choices = [self._whole_choice(index, deltas) for index, deltas in enumerate(by_choice)]
        lasts = [deltas[-1] for deltas in by_choice]
        body = {**self._envelope("chat.completion" if self.chat else "text_completion", choices, lasts[0]),
                **WHOLE_NULLS, "usage": {**total_usage(lasts, self.n), "completion_tokens_details": None}}
        if self.chat:  # vLLM's: the prompt's logprobs and ids on the chat response's top level
            body["prompt_logprobs"] = (self._prompt_logprobs(by_choice[0][0]) if self.prompt_logprobs is not None
                                       else None)
            body["prompt_token_ids"] = self.prompt_ids[0] if self.token_ids else None
            body["prompt_text"] = None
        return {**body, **TRANSFER_NULLS}

    def _whole_choice(self, index: int, outs: list[RequestOutput]) -> dict:
        first, last = outs[0], outs[-1]
        echoed = self._echoed(first)
        echo = self._echo_of(index)
        if echo is not None and echo.prompt_only:
            outs = []  # the token computed for max_tokens=0 is not returned (vLLM's echo without generation)
        text = (echo.text if echo is not None else "") + "".join(o.text for o in outs)
        logprobs = self._merged_logprobs(outs, echoed)
        token_ids = [t for o in outs for t in o.token_ids] if self.token_ids else None
        if self.chat:
            message, finish = {"role": "assistant", "content": text, **MESSAGE_NULLS}, last.finish_reason
            if self.tools is not None and self.tools.parser is not None:  # "auto": the parser's calls
                calls, content = auto_answer(self.tools, text)  # vLLM's: "tool_calls" whenever calls were found
                message = {"role": "assistant", "content": content, **MESSAGE_NULLS,
                           **({"tool_calls": calls} if calls else {})}
                finish = "tool_calls" if calls else finish
            elif self.tools is not None:  # vLLM's: content "", the calls; "required" finishes "tool_calls"
                calls = whole_calls(self.tools, text)  # none: left out, as vLLM's ChatMessage leaves it
                message = {"role": "assistant", "content": "", **MESSAGE_NULLS,
                           **({"tool_calls": calls} if calls else {})}
                if self.tools.finish_as_tool_calls and finish == "stop":
                    finish = "tool_calls"
            message["reasoning"] = None
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
                    "stop_reason": last.stop_reason, "token_ids": token_ids, "routed_experts": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason,
                "stop_reason": last.stop_reason, "token_ids": token_ids,
                # vLLM's: on each completion choice, whenever the prompt was scored
                "prompt_logprobs": self._prompt_logprobs(first) if self.prompt_logprobs is not None else None,
                "prompt_token_ids": self.prompt_ids[index // self.n] if self.token_ids else None,
                "routed_experts": None}

    def _prompt_logprobs(self, first: RequestOutput) -> list[dict | None]:
        return vllm_prompt_logprobs(self.prompt_ids[first.index // self.n], first.prompt_logprobs or [],
                                    self.prompt_logprobs, self._token)

    def _echo_of(self, index: int) -> Echo | None:
        """What goes before choice ``index``: its prompt's echo (None without echo)."""
        return None if self.echo is None else self.echo[index // self.n]

    def _echoed(self, first: RequestOutput) -> dict | None:
        """The logprobs of the echoed prompt of ``first``'s choice (None without echo or logprobs);
        read before the generated tokens' own, so that their text offsets follow the prompt's."""
        if self.echo is None or self.top_logprobs is None:
            return None
        echoed = echo_logprobs(self.prompt_ids[first.index // self.n], first.prompt_logprobs or [],
                               self.top_logprobs, self._token, self._offsets[first.index])
        if echoed["tokens"]:
            self._offsets[first.index] = echoed["text_offset"][-1] + len(echoed["tokens"][-1])
        return echoed

    def _merged_logprobs(self, outs: list[RequestOutput], echoed: dict | None = None) -> dict | None:
        if self.top_logprobs is None:
            return None
        parts = ([echoed] if echoed is not None else []) + [self._logprobs(o) for o in outs]
        if self.chat:
            return {"content": [entry for p in parts for entry in p["content"]]}
        return {key: [v for p in parts for v in p[key]] for key in parts[0]}

    # -- streaming -----------------------------------------------------------------------------

    def opening_chunks(self, first: RequestOutput) -> list[dict]:
        """The chunks that open a chat stream (the assistant role of each choice, as vLLM), sent
        with the ``first`` delta; none for completions."""
        if not self.chat:
            return []
        chunks = [self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}, first, completion_tokens=0)
                  for index in range(len(self._lasts))]
        for chunk in chunks:  # vLLM's: the prompt's ids (with return_token_ids) on the role chunks
            chunk["prompt_token_ids"] = self.prompt_ids[0] if self.token_ids else None
            chunk["prompt_text"] = None
        return chunks

    def chunk(self, out: RequestOutput) -> dict | None:
        """The chunk of one delta (its text, logprobs, and finish_reason and stop_reason once finished);
        None where vLLM 0.32 sends none: a tool stream's delta that streams nothing new (its parser's
        delta None), unfinished, with neither logprobs nor token_ids to carry (serving.py's
        ``chat_completion_stream_generator``)."""
        self._lasts[out.index] = out
        text = out.text
        if out.index in self._echo_unsent:  # the choice's first chunk: its prompt, then its first token's
            self._echo_unsent.discard(out.index)
            echoed, echo = self._echoed(out), self._echo_of(out.index)
            mine = [] if echo.prompt_only else [out]
            text = echo.text + "".join(o.text for o in mine)
            logprobs = self._merged_logprobs(mine, echoed)
        else:
            logprobs = self._logprobs(out) if self.top_logprobs is not None else None
        if self.chat:
            delta, finish = {"content": text}, out.finish_reason  # "" too: vLLM's DeltaMessage(content=text)
            if self._calls is not None:
                calls = self._calls[out.index]
                # a named call's every delta is argument text, "" too (vLLM's extract_named_tool_call_streaming)
                if isinstance(calls, AutoStream):  # its finishing delta sends what it held back
                    delta = calls.delta(text, finish is not None) if text or finish is not None else {}
                else:
                    delta = calls.delta(text) if text or isinstance(calls, NamedStream) else {}
                if not delta and finish is None and logprobs is None and not self.token_ids:
                    return None
                if not isinstance(calls, NamedStream) and calls.any_call and finish == "stop":
                    finish = "tool_calls"  # vLLM's rule, as in a whole response
            choice = {"index": out.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:  # vLLM's: stop_reason on a choice's finishing chunk only
                choice["stop_reason"] = out.stop_reason
        else:
            choice = {"index": out.index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason, "prompt_token_ids": None}
            if out.index in self._prompt_unsent:
                self._prompt_unsent.discard(out.index)
                choice["prompt_token_ids"] = self.prompt_ids[out.index // self.n]
        choice["token_ids"] = list(out.token_ids) if self.token_ids else None
        return self._chunk(choice, out)

    def usage_chunk(self) -> dict:
        """The closing chunk of include_usage: no choices, the usage of every choice streamed."""
        return {**self._envelope(self._chunk_object, [], self._lasts[0]), "usage": total_usage(self._lasts, self.n)}

    def _chunk(self, choice: dict, out: RequestOutput, completion_tokens: int | None = None) -> dict:
        body = self._envelope(self._chunk_object, [choice], out)
        if self.continuous_usage:  # else none: vLLM leaves it out but on the usage chunk (OpenAI: null)
            body["usage"] = usage(out, completion_tokens)
            if self.chat:  # vLLM's chat chunks' UsageInfo sets it (null); its completions' do not
                body["usage"]["completion_tokens_details"] = None
        return body

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list[dict], out: RequestOutput) -> dict:
        # the fingerprint on every chunk, as OpenAI's own streams carry it (vLLM: the last only);
        # a request's version is pinned at admission, so it is the same on all of them
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": fingerprint(out), "choices": choices}

    # -- logprobs ------------------------------------------------------------------------------

    def _token(self, token_id: int, context: list[int] | None = None) -> str:
        """``token_id``'s string after the tokens ``context`` (None: its own decoding)."""
        if self.token_ids_as_tokens:
            return f"token_id:{token_id}"
        return self._text(token_id) if context is None else self._text.in_context(token_id, context)

    def _top(self, lps: dict[int, float]) -> list[tuple[int, float]]:
        """Chat's ``top_logprobs`` of one position: the top_logprobs most likely tokens, best first
        (``lps`` holds them and the sampled token); with logprob_token_ids every entry, in its order."""
        if self.logprob_token_ids:
            return list(lps.items())
        return sorted(lps.items(), key=lambda kv: -kv[1])[: self.top_logprobs]

    def content_logprobs(self, out: RequestOutput) -> list[dict]:
        """A chat delta's logprobs entries (``logprobs.content``): per token ``{"token", "logprob",
        "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}`` (/v1/responses' output_text
        ``logprobs`` are these)."""
        return self._logprobs(out)["content"]

    def _logprobs(self, out: RequestOutput) -> dict:
        pairs = list(zip(out.token_ids, out.logprobs or []))
        # per position the choice's tokens before it (read once per delta, in order: vLLM's context
        # of a generated token's strings is the generated tokens only)
        history = self._context[out.index]
        contexts = []
        for t, _ in pairs:
            contexts.append(history[-4:])
            history.append(t)
        del history[:-4]
        if self.chat:
            return {"content": [{**self._chat_entry(t, lps[t], c), "top_logprobs":
                                 [self._chat_entry(u, lp, c) for u, lp in self._top(lps)]}
                                for (t, lps), c in zip(pairs, contexts)]}
        tokens = [self._token(t, c) for (t, _), c in zip(pairs, contexts)]
        offsets = []
        for token in tokens:
            offsets.append(self._offsets[out.index])
            self._offsets[out.index] += len(token)
        return {"tokens": tokens, "token_logprobs": [clamp(lps[t]) for t, lps in pairs],
                "top_logprobs": [{self._token(u, c): clamp(lp) for u, lp in
                                  (lps.items() if self.logprob_token_ids else with_token(lps, t, self.top_logprobs))}
                                 for (t, lps), c in zip(pairs, contexts)],
                "text_offset": offsets}

    def _chat_entry(self, token_id: int, logprob: float, context: list[int]) -> dict:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        # -inf (a token a grammar masks) as vLLM's -9999.0: JSON has no infinity; the bytes are the
        # token's own, whatever its string (vLLM's: the string's UTF-8, none for "")
        return {"token": self._token(token_id, context), "logprob": clamp(logprob),
                "bytes": list(self._token_bytes(token_id))}
