"""``serve --enable-log-requests`` / ``--max-log-len`` (serving/request_log.py) at unit level: the
end line's fields against hand-made deltas run through ``Metered`` (the hook the metrics use), the
refusal line, hostile text escaped onto one printable line, text only with ``max_log_len`` > 0, and
nothing logged without the flag. Through a server: tests/http/test_http_api.py's
test_request_log_lines_on_both_front_ends."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re

import pytest

from nlora_serve.engine.api import EngineError, RequestAborted, RequestOutput
from nlora_serve.log_format import JsonFormatter
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.auth import LOCAL_ADMIN, Authenticator, hash_key
from nlora_serve.serving.metrics import ServerMetrics, caller_of_key, key_of
from nlora_serve.serving.request_log import RequestLog, quoted
from nlora_serve.serving.server import _request_log
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build
from nlora_serve.serving.server_config import ServerConfig, StartupError
from nlora_serve.serving.stream import Metered

HOSTILE = "hi\n2026-12-07T04:10:00.000Z INFO nlora_serve.requests: forged\r\x1b[2J\x1b]0;pwned\x07\u2028\u202e"
LOGGER = "nlora_serve.requests"


def _metrics(log: RequestLog | None) -> ServerMetrics:
    return ServerMetrics(lambda: {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0,
                                  "preemptions": 0}, lambda: (0, 0), request_log=log)


def _delta(index: int, text: str, tokens: list[int], prompt: int, made: int, finish: str | None = None,
           error: str | None = None) -> RequestOutput:
    return RequestOutput("acme/engine-id", text, tokens, finish, prompt, made, error=error, adapter="lower",
                         adapter_version=3, index=index)


def _run(log: RequestLog | None, deltas: list, raise_at_end: BaseException | None = None, n: int = 1,
         choices: int = 1, prompt_ids: list[int] | None = None, take: int | None = None,
         client: str | tuple | None = None) -> None:
    metrics, admission = _metrics(log), Admission(max_queue=8)

    async def stream():
        for out in deltas:
            yield out
        if raise_at_end is not None:
            raise raise_at_end

    async def consume():
        timer = metrics.request("http", "acme", client=client)
        timer.describe("cmpl-7", "lower", prompt_ids, choices)
        metered = Metered(stream(), timer, admission.reserve(), n)
        try:
            seen = 0
            async for _ in metered:
                seen += 1
                if seen == take:  # the client goes away
                    break
        except (EngineError, RequestAborted):
            pass
        finally:
            await metered.aclose()

    asyncio.run(consume())


def _line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    return lines[0]


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""", line))


def test_a_finished_request_logs_one_line_with_its_usage_version_and_times(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    # n=2 on one prompt of 5 tokens: usage counts the prompt once, both choices' outputs (2 + 3)
    deltas = [_delta(0, "a", [1], 5, 1), _delta(1, "b", [2], 5, 1), _delta(0, "c", [3], 5, 2, "stop"),
              _delta(1, "d", [4, 5], 5, 3, "length")]
    _run(RequestLog(), deltas, n=2, choices=2)
    line = _line(caplog)
    assert line.startswith("request 'cmpl-7' ended: ")
    fields = _fields(line)
    assert fields["frontend"] == "http" and fields["tenant"] == "'acme'" and fields["adapter"] == "'lower'"
    assert " adapter='lower' v3 " in line
    assert (fields["prompt_tokens"], fields["output_tokens"]) == ("5", "5")
    assert fields["outcome"] == "finished" and fields["finish_reason"] == "'length'"
    assert float(fields["ttft_ms"]) <= float(fields["total_ms"]) < 5000
    assert "prompt=" not in line and "output=" not in line and "'a'" not in line  # no text without max_log_len


@pytest.mark.parametrize("exc, outcome", [(EngineError("step failed: CUDA error"), "error"),
                                          (RequestAborted("adapter 'lower' was unloaded (force)"), "aborted")])
def test_an_engine_failure_or_abort_names_its_reason(caplog, exc, outcome):
    caplog.set_level(logging.INFO, LOGGER)
    _run(RequestLog(), [_delta(0, "a", [1], 5, 1)], raise_at_end=exc)
    fields = _fields(_line(caplog))
    assert fields["outcome"] == outcome and fields["reason"] == repr(str(exc))
    assert (fields["prompt_tokens"], fields["output_tokens"]) == ("5", "1")


def test_a_request_closed_before_its_end_is_cancelled(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    _run(RequestLog(), [_delta(0, "a", [1], 5, 1), _delta(0, "b", [2], 5, 2), _delta(0, "c", [3], 5, 3, "stop")],
         take=1)
    fields = _fields(_line(caplog))
    assert fields["outcome"] == "cancelled" and "finish_reason" not in fields and fields["output_tokens"] == "1"


def test_hostile_text_stays_on_one_printable_line_and_is_cut_to_max_log_len(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    log = RequestLog(max_log_len=len(HOSTILE), decode=lambda ids: HOSTILE + "tail" * len(ids))
    _run(log, [_delta(0, HOSTILE, [1], 3, 1), _delta(0, "more", [2], 3, 2, "stop")], prompt_ids=[1, 2, 3])
    line = _line(caplog)
    assert line.isprintable()  # no newline, carriage return, ESC, BEL, line separator, bidi override
    assert "\\n2026-12-07T04:10:00.000Z INFO" in line and "\\x1b[2J" in line and "\\u202e" in line
    fields = _fields(line)
    assert fields["prompt"] == repr(HOSTILE) and fields["output"] == repr(HOSTILE)
    assert line.endswith("... (+12 chars) output=" + repr(HOSTILE) + "... (+4 chars)")
    assert quoted("abcdef", 2) == "'ab'... (+4 chars)"


def test_refusals_name_the_reason_and_tenant_and_nothing_is_logged_off(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    _metrics(RequestLog()).reject("permission_denied", "grpc", "acme", "not granted 'x\n'",
                                  client="ipv4:10.0.0.7:51234")
    assert _line(caplog) == "request refused: frontend=grpc client=10.0.0.7:51234 tenant='acme' " \
                            "reason=permission_denied message=\"not granted 'x\\n'\""
    caplog.clear()
    _metrics(RequestLog()).reject("queue_full", "grpc", "acme", "full", request_id="job\x1b-7")
    assert _line(caplog) == "request 'job\\x1b-7' refused: frontend=grpc client=- tenant='acme' reason=queue_full " \
                            "message='full'"
    caplog.clear()
    _metrics(RequestLog()).reject("unauthenticated", "http", None, "unknown API key", client=("192.0.2.1", 443))
    assert _line(caplog) == "request refused: frontend=http client=192.0.2.1:443 tenant=- reason=unauthenticated " \
                            "message='unknown API key'"
    caplog.clear()
    _metrics(None).reject("queue_full", "http", "acme", "full")  # off: counted, not logged
    _run(None, [_delta(0, "a", [1], 5, 1, "stop")])
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("client, shown", [
    (("192.0.2.1", 443), "192.0.2.1:443"),  # HTTP's request.client
    (("::1", 8000), "[::1]:8000"),
    (("testclient", 50000), "testclient:50000"),
    # uvicorn's X-Forwarded-For address has no port, given as 0: the line said 203.0.113.7:0 (s29-newcomer)
    (("203.0.113.7", 0), "203.0.113.7"), (("2001:db8::7", 0), "[2001:db8::7]"),
    ("ipv4:10.0.0.7:51234", "10.0.0.7:51234"),  # gRPC's context.peer()
    ("ipv6:[fe80::1%eth0]:51234", "[fe80::1%eth0]:51234"),
    ("unix:/run/nlora.sock", "unix:/run/nlora.sock"),
    (None, "-"), ("", "-"),
    (("1.2.3.4\nINFO forged", 1), "'1.2.3.4\\nINFO forged:1'"),  # a proxy's forwarded address: quoted
])
def test_refusal_lines_name_the_clients_address(caplog, client, shown):
    caplog.set_level(logging.INFO, LOGGER)
    RequestLog().refused("http", "queue_full", None, None, client=client)
    assert _line(caplog) == f"request refused: frontend=http client={shown} tenant=- reason=queue_full"


@pytest.mark.parametrize("client, shown", [(("192.0.2.1", 443), "192.0.2.1:443"),  # HTTP's request.client
                                          ("ipv6:[::1]:51234", "[::1]:51234"),  # gRPC's context.peer()
                                          (None, "-")])
def test_end_lines_name_the_clients_address(caplog, client, shown):
    caplog.set_level(logging.INFO, LOGGER)
    _run(RequestLog(), [_delta(0, "a", [1], 5, 1, "stop")], client=client)
    assert _line(caplog).startswith(f"request 'cmpl-7' ended: frontend=http client={shown} tenant='acme' ")


def _json(caplog) -> dict:
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    assert "\n" not in line and line.isascii() and line.isprintable()  # one line, no terminal escape
    return json.loads(line)


def test_json_lines_carry_each_value_as_its_own_key(caplog):
    """``serve --log-format json``: the end line's values unquoted, hostile text whole (JSON escapes
    it), ``null`` where the text line says ``-``; a refusal's too; never the key, only its id."""
    caplog.set_level(logging.INFO, LOGGER)
    log = RequestLog(max_log_len=len(HOSTILE), decode=lambda ids: HOSTILE)
    _run(log, [_delta(0, HOSTILE, [1], 3, 1), _delta(0, "x", [2], 3, 2, "stop")], prompt_ids=[1, 2],
         client="ipv4:10.0.0.7:51234")
    entry = _json(caplog)
    assert entry["message"] == _line(caplog)
    ttft, total = entry.pop("ttft_ms"), entry.pop("total_ms")
    assert 0 <= ttft <= total < 5000
    assert {k: v for k, v in entry.items() if k not in ("time", "message")} == {
        "level": "INFO", "logger": LOGGER, "event": "request_ended", "request_id": "cmpl-7", "frontend": "http",
        "client": "10.0.0.7:51234", "tenant": "acme", "key_id": None, "adapter": "lower", "adapter_version": 3,
        "prompt_tokens": 3, "output_tokens": 2, "outcome": "finished", "finish_reason": "stop", "reason": None,
        "prompt": HOSTILE, "output": HOSTILE + "... (+1 chars)"}  # HOSTILE + "x", cut at max_log_len
    caplog.clear()
    auth = Authenticator.from_document({"tenants": [{"name": "acme", "key_sha256": hash_key("secret-key-of-acme"),
                                                     "adapters": ["lower"]}]}, "t.json")
    key = caller_of_key(auth, [("authorization", "Bearer secret-key-of-acme")])[1]
    _metrics(RequestLog()).reject("queue_full", "grpc", "acme", "full\n", request_id="job-7", client=None, key=key)
    entry = _json(caplog)
    assert "secret-key-of-acme" not in json.dumps(entry)
    assert {k: v for k, v in entry.items() if k not in ("time", "message", "level", "logger")} == {
        "event": "request_refused", "request_id": "job-7", "frontend": "grpc", "client": None, "tenant": "acme",
        "key_id": hash_key("secret-key-of-acme")[:8], "reason": "queue_full", "error": "full\n"}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusal_lines_are_limited_per_reason_then_summarized_and_end_lines_never(caplog):
    """A client sending bad requests in a loop: 10 lines of a reason at once, then 2 a second
    (log_limit.py: the kernel's printk_ratelimit 10 per 5 s); the lines left out are counted in one
    summary line before the next line written; another reason keeps its own lines; end lines are
    not limited."""
    caplog.set_level(logging.INFO, LOGGER)
    clock = FakeClock()
    log = RequestLog(clock=clock)
    metrics = _metrics(log)

    def refuse(reason="unauthenticated", n=1):
        for _ in range(n):
            metrics.reject(reason, "http", None, "unknown API key", client=("192.0.2.9", 4000))

    def lines():
        out = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        caplog.clear()
        return out

    line = "request refused: frontend=http client=192.0.2.9:4000 tenant=- reason={} message='unknown API key'"
    refuse(n=10_000)  # at one instant: the burst of 10
    assert lines() == [line.format("unauthenticated")] * 10
    refuse("queue_full", n=3)  # another reason has its own bucket
    assert lines() == [line.format("queue_full")] * 3
    _run(log, [_delta(0, "a", [1], 5, 1, "stop")])  # a request that ran: its end line, whatever the flood
    assert [ended.split(":")[0] for ended in lines()] == ["request 'cmpl-7' ended"]
    clock.now += 0.4  # 0.8 of a line earned: still nothing
    refuse(n=100)
    assert lines() == []
    clock.now += 0.1  # one line earned: the summary of the 9,990 + 100 left out, then the line
    refuse(n=5)
    assert lines() == ["suppressed 10090 refusal lines (reason=unauthenticated) in the last 0.5 s",
                       line.format("unauthenticated")]
    refuse(n=7)  # counted from here
    clock.now += 30  # the flood stopped; the next refusal of any reason writes what is still owed
    refuse("queue_full")
    assert lines() == ["suppressed 11 refusal lines (reason=unauthenticated) in the last 30.0 s",
                       line.format("queue_full")]
    refuse(n=10)  # refilled to 10 (not 60) over those 30 s
    assert lines() == [line.format("unauthenticated")] * 10
    refuse()
    assert lines() == []


def test_server_config_fields():
    assert _request_log(ServerConfig(), None) is None  # off by default
    on = _request_log(ServerConfig(enable_log_requests=True, max_log_len=7), None)
    assert on is not None and on.max_log_len == 7
    with pytest.raises(ValueError, match="max_log_len must be an integer >= 0"):
        ServerConfig(enable_log_requests=True, max_log_len=-1)
    with pytest.raises(ValueError, match="only with ServerConfig.enable_log_requests on"):
        ServerConfig(max_log_len=10)


def test_serve_flags_fill_the_config_and_a_bad_one_names_its_flag(capsys):
    def configs(*flags: str) -> ServerConfig:
        parser = argparse.ArgumentParser()
        serve_cli.add_serve_arguments(parser)
        return serve_build._configs(parser.parse_args(["--http-port", "off", *flags]))[0]

    default = configs()
    assert (default.enable_log_requests, default.max_log_len) == (False, 0)
    given = configs("--enable-log-requests", "--max-log-len", "80")
    assert (given.enable_log_requests, given.max_log_len) == (True, 80)
    with pytest.raises(StartupError, match="^--max-log-len 5: logs request text only with --enable-log-requests on"):
        configs("--max-log-len", "5")
    with pytest.raises(SystemExit):
        configs("--enable-log-requests", "--max-log-len", "-1")
    assert "--max-log-len: must be an integer >= 0; got -1" in capsys.readouterr().err


def test_a_flood_that_stopped_is_summed_up_at_the_next_end_line(caplog):
    """A refusal flood ends and only admitted requests follow: the count left out is written before
    the next end line once its reason may write again (it waited for the next refusal, maybe forever)."""
    caplog.set_level(logging.INFO, LOGGER)
    clock = FakeClock()
    log = RequestLog(clock=clock)
    metrics = _metrics(log)
    for _ in range(25):
        metrics.reject("unauthenticated", "http", None, "unknown API key", client=("192.0.2.9", 4000))
    caplog.clear()
    _run(log, [_delta(0, "a", [1], 5, 1, "stop")])  # no budget yet: the end line alone
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == LOGGER] == ["request 'cmpl-7' ended"]
    caplog.clear()
    clock.now += 2.0
    _run(log, [_delta(0, "a", [1], 5, 1, "stop")])
    got = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert got[0] == "suppressed 15 refusal lines (reason=unauthenticated) in the last 2.0 s"
    assert got[1].startswith("request 'cmpl-") and " ended: " in got[1] and len(got) == 2


def test_lines_name_which_key_of_a_tenant_sent_the_request(caplog):
    """A key rotation (two entries of one tenant, then the old one removed) needs to know when the
    old key stops being sent: every line names the key by the first 8 hex digits of its sha256, as
    the tenants file's key_sha256 starts; with only the tenant's name, both keys' lines were alike."""
    old, new = hash_key("old-key-of-acme"), hash_key("new-key-of-acme")
    auth = Authenticator.from_document({"tenants": [
        {"name": "acme", "key_sha256": digest, "adapters": ["lower"]} for digest in (old, new)]}, "t.json")
    callers = [auth.authenticate([("authorization", f"Bearer {key}")])
               for key in ("old-key-of-acme", "new-key-of-acme")]
    assert callers[0] == callers[1]  # one tenant: the key's id is no part of its identity
    assert [key_of(auth, p) for p in callers] == [old[:8], new[:8]]
    assert key_of(Authenticator(None), LOCAL_ADMIN) is None  # auth off: no key to name
    caplog.set_level(logging.INFO, LOGGER)
    metrics = _metrics(RequestLog())
    metrics.reject("queue_full", "http", "acme", "full", key=key_of(auth, callers[0]))
    assert _line(caplog) == f"request refused: frontend=http client=- tenant='acme' key={old[:8]} reason=queue_full " \
                            "message='full'"
    caplog.clear()
    timer = metrics.request("grpc")
    timer.set_tenant("acme", key_of(auth, callers[1]))
    timer.describe("job-1", None, None)
    timer.ended("cancelled")
    assert _line(caplog).startswith(f"request 'job-1' ended: frontend=grpc client=- tenant='acme' key={new[:8]} "
                                    "adapter=base ")
    # the old key revoked (the new entry alone), its 401s still name it: the client has not switched
    auth.replace_keys(Authenticator.from_document({"tenants": [
        {"name": "acme", "key_sha256": new, "adapters": ["lower"]}]}, "t.json"))
    sent = [("authorization", "Bearer old-key-of-acme")]
    assert caller_of_key(auth, sent) == (None, old[:8])
    assert auth.presented_key_id([]) is None and Authenticator(None).presented_key_id(sent) is None
    caplog.clear()
    metrics.reject("unauthenticated", "http", None, "unknown API key", key=caller_of_key(auth, sent)[1])
    assert _line(caplog) == f"request refused: frontend=http client=- tenant=- key={old[:8]} " \
                            "reason=unauthenticated message='unknown API key'"
