"""serve's log lines say when (an operator reads them after an incident); one-shot commands' do not;
``serve --log-format json`` writes each record as one JSON object, whatever logger wrote it. The
request log's values in it: tests/test_request_log.py; through a server: tests/http/test_http_api.py's
test_request_log_lines_on_both_front_ends; the flag: tests/test_cli.py."""

import datetime
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_json_lines_are_one_object_with_the_text_lines_time_and_the_records_fields():
    """``serve --log-format json``: time as the text line's, level, logger, message, the record's
    fields as keys (never over those four), the exception's traceback as one string."""
    created = 1796616335.1234
    record = _record(created)
    record.log_fields = {"event": "admin_done", "adapter": "lower\n\x1b[2J", "adapter_version": 2, "message": "no"}
    try:
        raise ValueError("bad weights")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = log_format.JsonFormatter().format(record)
    assert "\n" not in line and line.isascii() and line.isprintable()
    entry = json.loads(line)
    assert entry.pop("exception").splitlines()[-1] == "ValueError: bad weights"
    assert entry == {"time": "2026-12-07T04:05:35.123Z", "level": "INFO",
                     "logger": "nlora_serve.serving.grpc_api.admin",
                     "message": "SwapAdapter by 'ops': adapter 'lower' v2 serving", "event": "admin_done",
                     "adapter": "lower\n\x1b[2J", "adapter_version": 2}
    assert log_format.fields(a=1) == {"log_fields": {"a": 1}}
    with pytest.raises(ValueError, match="log format must be one of"):
        log_format.configure("INFO", True, "xml")


JSON_PROCESS = """
import logging, sys, warnings
import uvicorn
from nlora_serve import log_format
log_format.configure("INFO", True, "json")
uvicorn.Config(None, log_config=None, log_level="warning", access_log=False)  # as http_api/server.py's
logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
logging.getLogger("uvicorn.error").info("not at uvicorn's level")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("grpc._cython.cygrpc").exception("Unexpected error in RPC")
warnings.warn("a library's warning")
log_format.error_line(ValueError("bad flag"), "json")
logging.getLogger("lib").warning("%d items", "x")  # a library's bad call: logging's handleError wrote 18 lines
import threading
worker = threading.Thread(target=lambda: 1 / 0, name="worker")
worker.start(); worker.join()
class Closing:
    def __del__(self): raise OSError("in __del__")
Closing()
raise KeyError("not caught")
"""


def test_json_mode_writes_uvicorns_grpcs_and_warnings_records_as_json_too():
    """No plain line in a JSON log: uvicorn's loggers (configured as the HTTP server configures them),
    gRPC's Python logger, ``warnings.warn``, the failure's last ``error:`` line, and the tracebacks
    Python writes itself (a thread's uncaught exception, one in ``__del__``, the process's own: 7-9
    plain lines each before)."""
    run = subprocess.run([sys.executable, "-c", JSON_PROCESS], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr  # the uncaught KeyError at the end
    entries = [json.loads(line) for line in run.stderr.splitlines()]
    assert [(e["logger"], e["level"]) for e in entries] == [
        ("uvicorn.error", "WARNING"), ("grpc._cython.cygrpc", "ERROR"), ("py.warnings", "WARNING"),
        ("nlora_serve", "ERROR"), ("lib", "WARNING")] + [("nlora_serve.uncaught", "ERROR")] * 3
    assert entries[4]["message"] == "%d items (not formatted: TypeError: %d format: a real number is required, not str)"
    assert [e["message"].split(":")[0] for e in entries[5:]] == [
        "exception in thread worker", "Exception ignored in", "uncaught exception"]
    assert [e["exception"].splitlines()[-1] for e in entries[5:]] == [
        "ZeroDivisionError: division by zero", "OSError: in __del__", "KeyError: 'not caught'"]
    assert entries[1]["exception"].endswith("ZeroDivisionError: division by zero")
    assert "a library's warning" in entries[2]["message"] and entries[3]["message"] == "error: bad flag"


FAKE_CONVERTER = """
import sys
from tqdm import tqdm
for _ in tqdm(range(3), desc="Loading weights"):  # as transformers' bars in the real conversion
    pass
print("a transformers warning", file=sys.stderr)
"""

CONVERT_PROCESS = """
import logging, sys
from pathlib import Path
from nlora_serve import log_format
from nlora_serve.models import resolve
log_format.configure("INFO", timed=True, fmt="json")
resolve.CONVERTER = "fake_converter"
resolve._convert(Path("model.gguf"), Path("."), "0" * 64)
"""


def test_json_mode_keeps_the_model_conversions_child_output_json_too(tmp_path, monkeypatch):
    """The first start converts the default model in a child process whose progress bars and
    warnings went to stderr as they were: under --log-format json, `jq` on the log stopped at the
    first bar ("parse error: Invalid numeric literal at line 2"), never reading the lines after it
    (s29-newcomer). Now no bar is drawn there, and the child's lines are records."""
    (tmp_path / "fake_converter.py").write_text(FAKE_CONVERTER)
    tree = Path(log_format.__file__).parents[1]  # the nlora_serve under test, not the installed one
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{tree}")  # _convert's child finds the fake through it
    run = subprocess.run([sys.executable, "-c", CONVERT_PROCESS], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    entries = [json.loads(line) for line in run.stderr.splitlines()]  # a plain line fails here
    assert [(e["logger"], e["level"], e["message"]) for e in entries] == [
        ("nlora_serve.models.resolve", "WARNING", "conversion: a transformers warning")]
