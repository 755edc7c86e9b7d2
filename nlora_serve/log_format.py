"""How nlora-serve's commands write their log lines (to stderr).

``serve`` is a long-running process whose log an operator reads after the fact (an incident, who
swapped or unloaded which adapter when, a reload of the tenants file): each of its lines starts with
the time, UTC in ISO 8601 to the millisecond (``2026-12-07T04:05:35.123Z INFO nlora_serve.serve:
...``), as vLLM's and nginx's lines carry theirs, so that a plain log file (``2> serve.log``,
``docker logs`` without ``-t``) still says when. The one-shot commands (generate, adapters, models,
keys, client, bench) write to a terminal, where a time adds nothing: level, logger, message.
"""

from __future__ import annotations

import logging
import time

PLAIN = "%(levelname)s %(name)s: %(message)s"
TIMED = "%(asctime)s " + PLAIN


class UtcFormatter(logging.Formatter):
    """:data:`TIMED` lines, ``%(asctime)s`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, whatever the
    machine's time zone)."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def configure(level: str, timed: bool) -> None:
    """Configure the root logger once (as :func:`logging.basicConfig`: a no-op when it has handlers
    already): records at ``level`` and above to stderr, with the time first when ``timed``
    (``serve``), else :data:`PLAIN`."""
    handler = logging.StreamHandler()
    handler.setFormatter(UtcFormatter(TIMED) if timed else logging.Formatter(PLAIN))
    logging.basicConfig(level=level, handlers=[handler])
