"""The OpenAI target against a small fake OpenAI-compatible server on loopback (stdlib http.server):
streamed SSE chunks become the right timings and counts, and every kind of error gets its code."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nlora_serve.cli import main
from nlora_serve.client.bench.keys import check_keys_cover
from nlora_serve.client.bench.openai_target import OpenAITarget, sse_data
from nlora_serve.client.bench.runner import LoadShape, run_load
from nlora_serve.client.bench.workload import LengthDist, TenantMix, Workload, WorkloadConfig

GAP_S = 0.03  # the fake server's pause before each text chunk
PIECES = ["Hel", "lo", "", " wor", "ld"]  # "" is a chunk without text: no ITL sample, no token


class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams PIECES (completions or chat) with a usage chunk; models "missing" / "busy" are
    refused with 404 / 429 and vLLM's numeric code, "quota" with 429 and our word (nlora-serve's
    rejection reason), "midfail" fails inside the stream. Bodies are kept in ``seen``."""

    seen: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # the base model is the entry without a parent, as ours and vLLM list it
        if self.headers.get("Authorization") == "Bearer refused-key":
            return self._json(401, {"error": {"message": "unknown API key", "type": "x", "code": 401}})
        models = [{"id": "acme", "parent": "fake-base"}, {"id": "fake-base", "parent": None}]
        if self.headers.get("Authorization") == "Bearer tenant-key":  # not granted the base: ours hides parents
            models = [{"id": "acme", "parent": None}, {"id": "globex", "parent": None}]
        self._json(200, {"object": "list", "data": models})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        status = {"missing": 404, "busy": 429, "quota": 429}.get(body["model"])
        if status:
            code = "tenant_quota" if body["model"] == "quota" else status
            return self._json(status, {"error": {"message": f"no {body['model']}", "type": "x", "code": code}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chat = self.path.endswith("/chat/completions")
        if chat:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        self.wfile.write(b": a comment line, ignored\n\n")
        for i, piece in enumerate(PIECES):
            time.sleep(GAP_S)
            if body["model"] == "midfail" and i == 2:
                return self._event({"error": {"message": "engine died", "type": "InternalServerError",
                                              "code": 500}})
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            self._event({"choices": [choice], "usage": None})
        self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj):
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    FakeOpenAI.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _run(url, endpoint, names, count=4, **target):
    workload = Workload(WorkloadConfig(seed=3, tenants=TenantMix(names, "round-robin"),
                                       prompt_len=LengthDist(5, 5), output_len=LengthDist(12, 12)))

    async def go():
        async with OpenAITarget(url, endpoint=endpoint, **target) as t:
            return await run_load(workload, t, LoadShape("closed", concurrency=2, num_requests=count), False)
    return asyncio.run(go()), workload


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_chunks_become_ttft_itl_and_usage(fake_server, endpoint):
    detok = (lambda ids: " ".join(map(str, ids))) if endpoint == "chat" else None
    run, workload = _run(fake_server, endpoint, ("acme", "beta"), api_key="k1", detokenize=detok)
    assert all(r.ok for r in run.results), [r.error_message for r in run.results]
    for r in run.results:
        assert len(r.chunk_s) == 4  # four chunks with text; the role chunk and "" are not output
        assert GAP_S * 0.9 <= r.ttft_s == r.chunk_s[0] < r.e2e_s
        # each text chunk left the server after 1, 2, 4, 5 pauses (the empty chunk took the third):
        # cumulative lower bounds, which a late delivery cannot break (a gap between two chunks
        # can shrink when the first is delayed on a loaded machine)
        assert all(t >= GAP_S * 0.9 * k for t, k in zip(r.chunk_s, (1, 2, 4, 5))), r.chunk_s
        assert r.chunk_s == sorted(r.chunk_s)
        assert (r.prompt_tokens, r.output_tokens) == (7, 12)  # from the usage chunk
    bodies = sorted(FakeOpenAI.seen, key=lambda b: b["seed"])
    want = sorted((r for r in workload.requests(count=4)), key=lambda r: r.seed)
    for body, req in zip(bodies, want):
        assert body["model"] == req.tenant and body["max_tokens"] == 12 and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
        assert body["auth"] == "Bearer k1" and body["path"] == f"/v1/{'chat/' if endpoint == 'chat' else ''}completions"
        if endpoint == "chat":
            assert body["messages"] == [{"role": "user", "content": " ".join(map(str, req.prompt))}]
        else:
            assert body["prompt"] == list(req.prompt)


def test_error_statuses_and_stream_errors_get_their_codes(fake_server):
    run, _ = _run(fake_server, "completions", ("missing", "busy", "midfail", "ok", "quota"), count=5,
                  base_model="base")
    by_tenant = {r.tenant: r for r in run.results}
    assert by_tenant["missing"].error == "HTTP 404" and by_tenant["missing"].error_message == "no missing"
    assert by_tenant["busy"].error == "HTTP 429"  # vLLM's code: the status again
    # helper-99's find: our 429s read "HTTP 429" whether the queue or a tenant quota refused them
    assert by_tenant["quota"].error == "HTTP 429 tenant_quota" and by_tenant["quota"].error_message == "no quota"
    assert by_tenant["midfail"].error == "HTTP 500" and by_tenant["midfail"].error_message == "engine died"
    assert len(by_tenant["midfail"].chunk_s) == 2 and by_tenant["ok"].ok


def test_base_requests_use_the_listed_base_model_or_the_given_one(fake_server):
    workload = Workload(WorkloadConfig(tenants=TenantMix(("acme",), base_share=0.5), prompt_len=LengthDist(3, 3),
                                       output_len=LengthDist(2, 2)))

    async def go(base_model):
        async with OpenAITarget(fake_server, base_model=base_model) as t:
            return await run_load(workload, t, LoadShape("closed", 2, num_requests=10), False)
    for base_model, want in ((None, "fake-base"), ("given", "given")):
        FakeOpenAI.seen = []
        run = asyncio.run(go(base_model))
        assert all(r.ok for r in run.results)
        assert {b["model"] for b in FakeOpenAI.seen} == {"acme", want}


def test_a_base_url_ending_in_v1_as_the_openai_sdk_spells_it_is_taken(fake_server):
    # h141: --base-url http://HOST:8000/v1 (the openai SDK's base_url, as the README's Python example has
    # it) sent every request to /v1/v1/completions: all 404, and the bench stopped.
    workload = Workload(WorkloadConfig(tenants=TenantMix(("acme",)), prompt_len=LengthDist(3, 3),
                                       output_len=LengthDist(2, 2)))

    async def go():
        async with OpenAITarget(fake_server + "/v1/") as t:
            return await run_load(workload, t, LoadShape("closed", 1, num_requests=2), False)
    FakeOpenAI.seen = []
    run = asyncio.run(go())
    assert [r.ok for r in run.results] == [True, True], [r.error for r in run.results]
    assert [(b["path"], b["model"]) for b in FakeOpenAI.seen] == [("/v1/completions", "acme")] * 2

def test_connection_refused_is_recorded_not_raised():
    run, _ = _run("http://127.0.0.1:9", "completions", ("a",), count=2, timeout=5)
    assert [r.error for r in run.results] == ["ConnectError", "ConnectError"]


def test_sse_parser_joins_multiline_data_and_skips_other_fields():
    lines = ["event: x", "data: {\"a\":", "data: 1}", "id: 3", "", ": note", "", "data:[DONE]"]

    async def collect():
        async def source():
            for line in lines:
                yield line
        return [d async for d in sse_data(source())]
    assert asyncio.run(collect()) == ['{"a":\n1}', "[DONE]"]


def test_cli_end_to_end_against_the_fake_server(fake_server, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--tenants", "acme,missing",
               "--popularity", "round-robin", "--num-requests", "6", "--concurrency", "3", "--output-len", "12",
               "--json", str(out), "--no-progress", "--api-key", "secret-key"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 3 and doc["summary"]["errors"] == {"HTTP 404": 3}
    assert doc["summary"]["output_tokens"] == 36 and "secret-key" not in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "HTTP 404 × 3" in printed
    assert printed.endswith(f"wrote {out} and {out.with_suffix('.png')}\n")  # where the plot went, too


@pytest.mark.parametrize("mode", [["--concurrency", "2"], ["--mode", "open", "--rate", "50"]])
def test_cli_stops_early_naming_the_model_when_the_first_requests_all_fail_alike(fake_server, tmp_path, capsys,
                                                                                 mode):
    out = tmp_path / "r.json"
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--tenants", "missing",
               "--num-requests", "200", "--output-len", "4", "--json", str(out), "--no-progress", *mode])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.count("no missing") == 1  # the server's message, once
    assert "first 8 requests all failed with HTTP 404" in err and "tenants asked for: missing" in err
    # stopped: in-flight ones finished, no more were sent (open mode keeps sending until the first 8
    # answers are in: at 50 requests/s that bound leaves a loaded 2-core box 1.8 s for them, not 0.2)
    assert 8 <= len(FakeOpenAI.seen) < (20 if "--concurrency" in mode else 100)


def test_overload_or_mixed_errors_do_not_stop_a_run(fake_server):
    for busy in ("busy", "quota"):  # 429: the server is there, just full
        run, _ = _run(fake_server, "completions", (busy,), count=12)
        assert len(run.results) == 12 and run.stopped is None
    run, _ = _run(fake_server, "completions", ("missing", "acme"), count=12)  # some succeed
    assert len(run.results) == 12 and run.stopped is None


def test_a_key_seeing_only_its_adapters_never_makes_one_of_them_the_base_model(fake_server, tmp_path, capsys):
    # h61's find: to a key not granted the base model our /v1/models lists its adapters, each without
    # a parent; the bench took the first adapter for the base model and sent it the base share.
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--api-key", "tenant-key",
               "--num-requests", "4", "--output-len", "4", "--json", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not FakeOpenAI.seen, FakeOpenAI.seen
    assert ("lists 2 entries without a parent (acme, globex), so which is the base model cannot be told; a key "
            "not granted the base model sees only its adapters so)") in err
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--api-key", "tenant-key", "--tenants", "acme",
               "--num-requests", "4", "--output-len", "4", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0 and [s["model"] for s in FakeOpenAI.seen] == ["acme"] * 4  # tenant traffic needs no base


@pytest.mark.parametrize("case", ["unreachable", "refused key"])
def test_cli_says_why_the_base_model_name_is_unknown(fake_server, tmp_path, capsys, case):
    # A newcomer's find: a base-model run against a --base-url with no server said only "the base
    # model's name is unknown (not in GET /v1/models): give --base-model", hiding the refused connection.
    url, key = ("http://127.0.0.1:9", "k") if case == "unreachable" else (fake_server, "refused-key")
    rc = main(["bench", "--target", "openai", "--base-url", url, "--api-key", key, "--num-requests", "8",
               "--output-len", "4", "--json", str(tmp_path / "r.json"), "--no-progress", "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "the base model's name is unknown (GET " + url + "/v1/models " in err
    if case == "unreachable":
        assert "failed: ConnectError:" in err
    else:
        assert "answered HTTP 401: unknown API key)" in err
    assert err.rstrip().endswith("check --base-url and --api-key, or give --base-model")


@pytest.fixture
def grpc_port():
    """A gRPC server (HTTP/2 only, no services) on loopback: what `serve --port` listens with."""
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.mark.parametrize("tenants", [[], ["--tenants", "acme"]])
def test_the_grpc_port_as_base_url_names_the_http_port_flag(grpc_port, tmp_path, capsys, tenants):
    # helper-99's find: --base-url at the gRPC port stopped with "RemoteProtocolError: illegal request
    # line" and no word of which port to give (h11's words for a reply in binary: HTTP/2 frames)
    url = f"http://127.0.0.1:{grpc_port}"
    rc = main(["bench", "--target", "openai", "--base-url", url, *tenants, "--num-requests", "8",
               "--output-len", "4", "--json", str(tmp_path / "r.json"), "--no-progress", "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "RemoteProtocolError" in err and "illegal request line" in err
    assert (f"{url} answered in no HTTP/1.1: is it nlora-serve's gRPC port (serve --port, 50051 by default)? "
            "--base-url takes the OpenAI HTTP port (serve --http-port, 8000 by default); --target grpc --server "
            "HOST:PORT benches the gRPC port") in err


KEYS = {"acme": "key-acme", "globex": "key-globex"}


def test_http_requests_send_their_tenants_key_through_the_cli(fake_server, tmp_path, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--tenants", "acme,globex",
               "--popularity", "round-robin", "--num-requests", "4", "--output-len", "2", "--keys-file", str(keys),
               "--json", str(tmp_path / "r.json"), "--no-progress", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    assert sorted((b["model"], b["auth"]) for b in FakeOpenAI.seen) == [
        ("acme", "Bearer key-acme")] * 2 + [("globex", "Bearer key-globex")] * 2
    assert "key-acme" not in (tmp_path / "r.json").read_text()  # the path is recorded, never a key


def test_a_keys_file_that_leaves_a_request_without_a_key_is_refused_before_any(fake_server, tmp_path, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    rc = main(["bench", "--target", "openai", "--base-url", fake_server, "--tenants", "acme,initech",
               "--base-share", "0.5", "--num-requests", "4", "--keys-file", str(keys),
               "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 2 and not FakeOpenAI.seen
    assert capsys.readouterr().err == ("error: --keys-file has no key for initech, (base model): add them, or give "
                                       "--api-key for the requests it does not cover\n")
    check_keys_cover(KEYS, ("acme", "initech"), 0.5, "key-default")  # --api-key covers the rest
