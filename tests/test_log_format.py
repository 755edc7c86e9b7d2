"""serve's log lines say when (an operator reads them after an incident); one-shot commands' do not."""

import datetime
import logging
import time

from nlora_serve import log_format


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("nlora_serve.serving.grpc_api.admin", logging.INFO, __file__, 1,
                               "SwapAdapter by %r: adapter 'lower' v2 serving", ("ops",), None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_serve_lines_start_with_the_utc_time_to_the_millisecond_whatever_the_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")  # not UTC: the line must not follow the machine's zone
    time.tzset()
    try:
        created = 1796616335.1234
        line = log_format.UtcFormatter(log_format.TIMED).format(_record(created))
    finally:
        monkeypatch.undo()
        time.tzset()
    utc = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    assert utc.isoformat(timespec="milliseconds") == "2026-12-07T04:05:35.123+00:00"
    assert line == "2026-12-07T04:05:35.123Z INFO nlora_serve.serving.grpc_api.admin: SwapAdapter by 'ops': " \
                   "adapter 'lower' v2 serving"
    assert logging.Formatter(log_format.PLAIN).format(_record(created)) == \
        "INFO nlora_serve.serving.grpc_api.admin: SwapAdapter by 'ops': adapter 'lower' v2 serving"
