"""How nlora-serve's commands write their log lines (to stderr).

``serve`` is a long-running process whose log an operator reads after the fact (an incident, who
swapped or unloaded which adapter when, a reload of the tenants file): each of its lines starts with
the time, UTC in ISO 8601 to the millisecond (``2026-12-07T04:05:35.123Z INFO nlora_serve.serve:
...``), as vLLM's and nginx's lines carry theirs, so that a plain log file (``2> serve.log``,
``docker logs`` without ``-t``) still says when. The one-shot commands (generate, adapters, models,
keys, client, bench) write to a terminal, where a time adds nothing: level, logger, message.

``serve --log-format json`` writes one JSON object per line instead, for a log pipeline (Loki,
Elasticsearch, CloudWatch) to index without a parser of ours, as structlog's ``JSONRenderer`` or
python-json-logger do::

    {"time": "2026-12-07T04:05:35.123Z", "level": "INFO", "logger": "nlora_serve.requests",
     "message": "request 'cmpl-3f2a' ended: ...", "event": "request_ended", "request_id": "cmpl-3f2a", ...}

(one line): ``time`` as the text lines', ``level``, ``logger``, ``message`` (the text line's message,
whole), then the record's fields (:func:`fields`: the request log's and the admin lines' values, each
its own key), ``exception`` (the traceback, one string) where the record has one. Every record of the
process goes through the root logger's handler, uvicorn's (``log_config=None``) and gRPC's Python
loggers included, and ``warnings.warn`` too (``py.warnings``), and the tracebacks Python writes to
stderr by itself (an exception no code caught: in a thread, ``Exception ignored in`` from a
``__del__``, or the process's own; :func:`route_uncaught`), so no plain line is mixed in; what C code
writes to stderr itself (gRPC's core, at ``GRPC_VERBOSITY``, ERROR by default) cannot be.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

PLAIN = "%(levelname)s %(name)s: %(message)s"
TIMED = "%(asctime)s " + PLAIN
FORMATS = ("text", "json")  # serve --log-format
_FIELDS = "log_fields"  # the LogRecord attribute :func:`fields` sets


def utc_time(record: logging.LogRecord) -> str:
    """``record``'s time as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, whatever the machine's time zone)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class UtcFormatter(logging.Formatter):
    """:data:`TIMED` lines, ``%(asctime)s`` as :func:`utc_time`."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return utc_time(record)


def fields(**values) -> dict[str, dict]:
    """``extra=`` for a logging call whose record carries ``values`` (JSON-serializable; None is
    ``null``): separate keys in a :class:`JsonFormatter` object, nothing in a text line.

    Example: ``log.info("%s", line, extra=log_format.fields(event="request_ended", total_ms=120.4))``.
    """
    return {_FIELDS: values}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring). Non-ASCII characters and
    control characters come out as ``\\uXXXX`` escapes, so no value a client chose can break the line
    or drive a terminal; a value JSON cannot hold is written as its ``str``. A record whose message
    cannot be formatted (a library's ``log.warning("%d", "x")``) is one object too, its format string
    as the message: logging's handleError wrote ~18 plain lines for it ("--- Logging error ---", a
    traceback, the call's arguments)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as exc:  # noqa: BLE001 (whatever a caller's format and arguments raise)
            message = f"{record.msg} (not formatted: {type(exc).__name__}: {exc})"
        entry = {"time": utc_time(record), "level": record.levelname, "logger": record.name, "message": message}
        for key, value in getattr(record, _FIELDS, {}).items():
            entry.setdefault(key, value)  # the four above are never overwritten
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def json_active() -> bool:
    """Whether the root logger writes :class:`JsonFormatter` lines (``serve --log-format json``):
    then a child process's stderr must come through logging too (see
    :func:`nlora_serve.models.resolve`'s conversion), or its plain lines would break the JSON log."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def error_line(exc: BaseException, fmt: str = "text") -> None:
    """A command's failure, its last word: ``error: MESSAGE`` on stderr in text, an ERROR record of
    the ``nlora_serve`` logger in json (no plain line in a JSON log)."""
    if fmt == "json":
        logging.getLogger("nlora_serve").error("error: %s", exc)
    else:
        print(f"error: {exc}", file=sys.stderr)


def usage_error(prog: str, message: str, usage: str) -> None:
    """A command line's usage error (argparse's ``PROG: error: MESSAGE`` after its usage lines) as
    one ERROR record of the ``nlora_serve`` logger, for json mode (:func:`json_active`): message
    ``error: PROG: MESSAGE``, with ``event`` "usage_error", ``usage`` (the usage text, stripped) and
    ``error`` (argparse's message) as fields. The caller exits with status 2, as argparse does."""
    logging.getLogger("nlora_serve").error("error: %s: %s", prog, message, extra=fields(
        event="usage_error", usage=usage.strip(), error=message))


def configure(level: str, timed: bool, fmt: str = "text") -> None:
    """Configure the root logger once (as :func:`logging.basicConfig`: a no-op when it has handlers
    already): records at ``level`` and above to stderr, with the time first when ``timed``
    (``serve``), else :data:`PLAIN`; ``fmt`` "json" writes :class:`JsonFormatter` objects instead
    (``timed`` or not) and routes ``warnings.warn`` and Python's own tracebacks
    (:func:`route_uncaught`) through logging.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}; got {fmt!r}")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(UtcFormatter(TIMED) if timed else logging.Formatter(PLAIN))
    logging.basicConfig(level=level, handlers=[handler])
    if fmt == "json":
        logging.captureWarnings(True)
        if handler in logging.getLogger().handlers:  # not where basicConfig was a no-op (a test's own handlers)
            route_uncaught()


UNCAUGHT = logging.getLogger("nlora_serve.uncaught")


def route_uncaught(logger: logging.Logger = UNCAUGHT) -> None:
    """Make the tracebacks Python prints to stderr itself records of ``logger`` (ERROR, the
    traceback as the record's exception): an exception no code caught in a thread
    (``threading.excepthook``, "Exception in thread NAME:"), one raised where it cannot be
    (``sys.unraisablehook``, "Exception ignored in: ..."), and the process's own
    (``sys.excepthook``). Their default hooks write several plain lines, which broke a JSON log's
    one-object-per-line rule (a log pipeline indexes each line of the traceback as a record of its own)."""
    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as the default hook: a thread's sys.exit() is silent
            return
        name = args.thread.name if args.thread is not None else "?"
        logger.error("exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable_hook(args) -> None:
        try:
            where = repr(args.object)
        except Exception:  # noqa: BLE001 (a repr that raises, as the default hook allows)
            where = f"<{type(args.object).__name__} object>"
        logger.error("%s: %s", args.err_msg or "Exception ignored in", where,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def process_hook(exc_type, exc, traceback) -> None:
        logger.error("uncaught exception", exc_info=(exc_type, exc, traceback))

    threading.excepthook, sys.unraisablehook, sys.excepthook = thread_hook, unraisable_hook, process_hook
