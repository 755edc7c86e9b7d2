"""``serve --enable-log-requests``: one INFO line per generation request, for an operator who must
find after the fact who sent the request that failed at 04:10 (DESIGN §6). Off by default, as vLLM's.

Both front ends (gRPC Generate; HTTP completions, chat completions, responses) write the same
lines, to the ``nlora_serve.requests`` logger, whichever engine runs behind them (``--backend vllm``
too). An admitted request writes one line when it ends, from where its end is counted for the
metrics (:meth:`~nlora_serve.serving.metrics.RequestTimer.ended`)::

    request cmpl-3f2a ended: frontend=http client=10.0.0.7:51234 tenant='acme' key=88e1ad5f adapter='lower' v2
    prompt_tokens=12 output_tokens=8 ttft_ms=35.1 total_ms=120.4 outcome=finished finish_reason='stop'

(one line; ``outcome`` is one of :data:`~nlora_serve.serving.metrics.ENDED_OUTCOMES`, with
``reason=`` the engine's message for aborted and error). A request refused before it ran writes
one line naming the reason (a ``nlora_requests_rejected_total`` reason) and the refusal's message::

    request 'job-42' refused: frontend=grpc client=10.0.0.7:51234 tenant='acme' key=88e1ad5f reason=queue_full
    message='server queue is full ...'

(one line; the id when its client chose one: gRPC's ``request_id``; ``client``, on both kinds of
line, the address the request came from: HTTP's ``request.client``, gRPC's ``context.peer()``
without its ``ipv4:`` / ``ipv6:`` scheme, ``-`` when unknown: :func:`client_address`). Refusal
lines are rate-limited per reason (log_limit.py: 10 at once, then 2 a second, the Linux kernel's
printk defaults), the lines left out counted in a line ``suppressed K refusal lines (reason=R) in
the last T s``; end lines never are. ``tenant`` is the caller's name in the tenants file (never its key; ``-`` for a key
missing or unknown, ``anonymous`` without a tenants file), followed by ``key=`` and the first 8 hex
digits of its key's sha256 (the tenants file's ``key_sha256``): during a key rotation, the old key's
id still appearing says a client still sends it; a refusal of an unknown key names its id too
(``tenant=- key=...``: a revoked key, whose id the old entry's hash starts with). Unlike vLLM, which logs each request at
its arrival too, there is no admission line: the end line's time less ``total_ms`` is the arrival, and the
requests running now are in ``/metrics``. The prompt's and the first choice's text are logged only
with ``--max-log-len N`` > 0 (vLLM's default, None, logs them whole): their first N characters,
the prompt as the engine ran it (a chat rendered by its template), decoded from its first 2N tokens.
Every value a client chose (text, ids, adapter names, messages) is written with Python's ``repr``
quoting, ``=`` as ``\\x3d`` (:func:`quoted`), so a newline or a terminal escape in it cannot forge a
log line or drive the operator's terminal, and no ``name=`` inside it can pass for a field of the line
(``grep "tenant='acme'"`` finds the tenant, not a request id saying so). With
``serve --log-format json`` (log_format.py) each line is a JSON object whose ``message`` is the
line above and whose other keys are its values, unquoted (``event``
``request_ended`` / ``request_refused``, ``request_id``, ``frontend``, ``client``, ``tenant``,
``key_id``, ``adapter``, ``adapter_version``, ``prompt_tokens``, ``output_tokens``, ``ttft_ms``,
``total_ms``, ``outcome``, ``finish_reason``, ``reason``, ``error`` (a refusal's message),
``prompt``, ``output``; ``null`` for what the text line writes as ``-``), cut at the same lengths.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from nlora_serve import log_format
from nlora_serve.errors import capped
from nlora_serve.serving.log_limit import RefusalLineLimit

log = logging.getLogger("nlora_serve.requests")


def quoted(text: str, limit: int | None = None) -> str:
    """``text`` (its first ``limit`` characters, saying how many were left out) in ``repr`` quoting:
    newlines, carriage returns, ANSI escapes and every other non-printable character (Unicode's line
    separators and bidi overrides included) come out as backslash escapes, so the result is one line
    of printable characters; ``=`` comes out as ``\\x3d`` (still a Python literal of ``text``), so
    every ``name=`` on a line is one of its fields: a client's ``x tenant='acme'`` cannot be taken
    for the tenant by a search for ``tenant='...'``."""
    if limit is not None and len(text) > limit:
        return f"{_literal(text[:limit])}... (+{len(text) - limit} chars)"
    return _literal(text)


def _literal(text: str) -> str:
    return repr(text).replace("=", "\\x3d")


class RequestRecord:
    """What the end line of one admitted request says, filled in as the request runs (the front end
    sets its id, adapter and prompt; :class:`~nlora_serve.serving.stream.Metered` its deltas)."""

    __slots__ = ("request_id", "client", "adapter", "version", "prompt_ids", "choices", "usage", "finish_reason",
                 "reason", "text", "_keep")

    def __init__(self, keep_text: int = 0):
        self.request_id: str | None = None  # the id its client sees (the response id on HTTP)
        self.client: str | tuple | None = None  # where it came from (:func:`client_address`'s input)
        self.adapter: str | None = None  # the adapter it asked for, then the one it ran on (None: the base model)
        self.version: int | None = None  # that adapter's version, once a delta names it (0: the base model)
        self.prompt_ids: list[int] | None = None  # its (first) prompt, for --max-log-len
        self.choices = 1  # choices per prompt (``n``): usage counts each prompt once, as responses.total_usage
        self.usage: dict[int, tuple[int, int]] = {}  # choice index -> (prompt tokens, completion tokens) so far
        self.finish_reason: str | None = None  # the last finished choice's
        self.reason: str | None = None  # why the engine aborted it or failed
        self.text: list[str] = []  # choice 0's text, its first ``keep_text`` characters
        self._keep = keep_text

    def seen(self, out) -> None:
        """One delta (:class:`~nlora_serve.engine.api.RequestOutput`) of the request."""
        if self.request_id is None:
            self.request_id = out.request_id
        self.adapter, self.version = out.adapter, out.adapter_version
        self.usage[out.index] = (out.prompt_tokens, out.completion_tokens)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        if out.error:
            self.reason = out.error
        if self._keep and out.index == 0 and out.text and sum(map(len, self.text)) <= self._keep:
            self.text.append(out.text)

    def tokens(self) -> tuple[int, int]:
        """(prompt tokens, output tokens): each prompt once, every choice's output, as the response's usage."""
        prompt = sum(p for i, (p, _) in self.usage.items() if i % self.choices == 0)
        return prompt, sum(c for _, c in self.usage.values())


class RequestLog:
    """Writes one server's request lines to ``logger`` (INFO). ``max_log_len`` > 0 adds the first
    that many characters of the prompt (decoded with ``decode``: token ids -> text) and of the output."""

    def __init__(self, max_log_len: int = 0, decode: Callable[[list[int]], str] | None = None,
                 logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic):
        if max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0; got {max_log_len!r}")
        self.max_log_len, self._decode, self._log = max_log_len, decode, logger
        self._limit = RefusalLineLimit(clock)  # refusal lines per reason (log_limit.py); clock: monotonic seconds
        if not logger.isEnabledFor(logging.INFO):
            logger.warning("--enable-log-requests is on but the log level is above INFO: no request is logged")

    def record(self) -> RequestRecord:
        """A new request's record."""
        return RequestRecord(self.max_log_len)

    def ended(self, frontend: str, tenant: str | None, record: RequestRecord, outcome: str,
              ttft: float | None, start: float, duration: float | None, key: str | None = None) -> None:
        """Log that an admitted request of ``tenant`` on ``frontend`` ended with ``outcome``
        (``ttft``, ``duration``: seconds, None when it had no token / did not run to its end;
        ``start``: its receipt, perf_counter seconds; ``key``: the id of the key it came with,
        auth.key_id, None: not said)."""
        total = duration if duration is not None else time.perf_counter() - start
        prompt, output = record.tokens()
        adapter = "base" if record.adapter is None else f"{quoted(record.adapter, 200)} v{record.version or '?'}"
        ttft_ms = None if ttft is None else round(ttft * 1e3, 1)
        reason = capped(record.reason) if record.reason and outcome in ("aborted", "error") else None
        values = dict(event="request_ended", request_id=_cut(record.request_id, 200), frontend=frontend,
                      client=peer(record.client), tenant=_cut(tenant, 200), key_id=key,
                      adapter=_cut(record.adapter, 200), adapter_version=record.version if record.adapter else None,
                      prompt_tokens=prompt, output_tokens=output, ttft_ms=ttft_ms, total_ms=round(total * 1e3, 1),
                      outcome=outcome, finish_reason=record.finish_reason, reason=reason)
        line = (f"request {quoted(record.request_id or '-', 200)} ended: frontend={frontend} "
                f"client={client_address(record.client)} tenant={_who(tenant, key)} "
                f"adapter={adapter} prompt_tokens={prompt} output_tokens={output} "
                f"ttft_ms={'-' if ttft is None else f'{ttft * 1e3:.1f}'} total_ms={total * 1e3:.1f} outcome={outcome}")
        if record.finish_reason is not None:
            line += f" finish_reason={quoted(record.finish_reason)}"
        if reason is not None:
            line += f" reason={quoted(reason)}"
        if self.max_log_len:
            text, (shown, prompt_text) = ''.join(record.text), self._prompt(record)
            line += f" prompt={shown} output={quoted(text, self.max_log_len)}"
            values.update(prompt=prompt_text, output=_cut(text, self.max_log_len))
        for summary in self._limit.due():  # a flood of refusals that stopped is summed up here too
            self._log.info("%s", summary)
        self._log.info("%s", line, extra=log_format.fields(**values))

    def refused(self, frontend: str, reason: str, tenant: str | None, message: str | None,
                request_id: str | None = None, client: str | tuple | None = None, key: str | None = None) -> None:
        """Log that a request of ``tenant`` (None: its key was missing or unknown, or not checked
        yet) on ``frontend`` was refused for ``reason`` (a ``nlora_requests_rejected_total`` reason)
        with ``message`` (what its client was told); ``request_id``: the id its client chose (gRPC's
        ``request_id``), when known; ``client``: where it came from (:func:`client_address`'s
        input); ``key``: the id of the key it came with (auth.key_id), None: not said.
        Rate-limited per reason (log_limit.py): a line left out is counted in a later
        ``suppressed ...`` line."""
        write, summaries = self._limit.take(reason)
        for summary in summaries:
            self._log.info("%s", summary)
        if not write:
            return
        named = "" if request_id is None else f" {quoted(request_id, 200)}"
        line = (f"request{named} refused: frontend={frontend} client={client_address(client)} "
                f"tenant={_who(tenant, key)} "
                f"reason={reason}")
        if message is not None:
            line += f" message={quoted(capped(message))}"
        values = dict(event="request_refused", request_id=_cut(request_id, 200), frontend=frontend,
                      client=peer(client), tenant=_cut(tenant, 200), key_id=key, reason=reason,
                      error=None if message is None else capped(message))
        self._log.info("%s", line, extra=log_format.fields(**values))

    def _prompt(self, record: RequestRecord) -> tuple[str, str | None]:
        """The prompt's first ``max_log_len`` characters: (``repr``-quoted, ``-`` when unknown; as
        they are, None when unknown: JSON's value)."""
        if record.prompt_ids is None or self._decode is None:
            return "-", None
        ids = record.prompt_ids
        # a token is at least one character but for a few byte pieces: 2N tokens hold N characters
        text = self._decode(ids[:2 * self.max_log_len])
        if len(ids) <= 2 * self.max_log_len:
            return quoted(text, self.max_log_len), _cut(text, self.max_log_len)
        head, more = text[:self.max_log_len], f"... (prompt of {len(ids)} tokens)"
        return _literal(head) + more, head + more


_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.:\[\]%_/-]{1,300}")  # hosts, ports, IPv6 brackets and zones, paths


def peer(client: str | tuple | None) -> str | None:
    """A client's address unquoted (:func:`client_address`'s, for a JSON value), its first 300
    characters; None for None or an empty one."""
    text = _address(client)
    return None if text is None else text[:300]


def _address(client: str | tuple | None) -> str | None:
    if not client:
        return None
    if isinstance(client, tuple):
        host, port = str(client[0]), client[1] if len(client) > 1 else None
        host = f"[{host}]" if ":" in host else host
        # port 0: none known (uvicorn's for an X-Forwarded-For address, which carries none)
        return host if not port else f"{host}:{port}"
    return client.removeprefix("ipv4:").removeprefix("ipv6:") or None


def client_address(client: str | tuple | None) -> str:
    """A client's address as a log line writes it: ``host:port`` (``[v6addr]:port`` for IPv6; the
    host alone where the port is 0, an ``X-Forwarded-For`` address's).

    Args:
        client: HTTP's ``request.client`` (a (host, port) pair, or None when the server does not
            know it; uvicorn's: ``X-Forwarded-For``'s address where the connection comes from an
            address ``FORWARDED_ALLOW_IPS`` trusts, loopback by default, and it is an IP address,
            else the connection's: http_api/forwarded.py),
            gRPC's ``context.peer()`` (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``,
            ``unix:/path``: the ``ipv4:`` / ``ipv6:`` scheme is dropped, others kept), or None.

    Returns:
        The address; ``-`` for None or an empty one; :func:`quoted` when it holds anything but
        address characters (a proxy's forwarded address is the client's to choose; the HTTP server
        takes only an IP address from ``X-Forwarded-For``: http_api/forwarded.py).
    """
    text = _address(client)
    if text is None:
        return "-"
    return text if _PLAIN_ADDRESS.fullmatch(text) else quoted(text, 200)


def _cut(text: str | None, limit: int) -> str | None:
    """``text``'s first ``limit`` characters, saying how many were left out (:func:`quoted`'s cut,
    unquoted: a JSON value); None stays None."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}... (+{len(text) - limit} chars)"


def _who(tenant: str | None, key: str | None = None) -> str:
    """``'acme'`` (``-`` for no tenant: a key missing or unknown), with ``key=3f2a9c1b`` after it
    where the key's id is given."""
    who = "-" if tenant is None else quoted(tenant, 200)
    return who if key is None else f"{who} key={key}"
