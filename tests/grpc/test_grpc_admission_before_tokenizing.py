"""gRPC's twin of tests/http/test_admission_before_tokenizing.py: a Generate over its tenant's
quota or the queue is RESOURCE_EXHAUSTED before its prompt is tokenized, and a request that holds
its place while it waits for the tokenizer gives it back when refused or cancelled (deadline), and
one whose client reads nothing of its stream gives it back after the send deadline."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from admission_harness import (CAPPED_KEY, FREE_KEY, HOLD, MAX_QUEUE, OTHER_KEY, QUOTA, HeldTokenizer, admission_counts,
                               wait_for, write_quota_tenants)
from nlora_serve.client import DeadlineExceeded, InvalidArgument, NloraClient, ResourceExhausted
from nlora_serve.engine.api import max_prompt_bytes
from nlora_serve.proto import REASON_KEY
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.grpc_api import send_deadline

@pytest.fixture(scope="module")
def server(make_module_server, tmp_path_factory):
    path = write_quota_tenants(tmp_path_factory.mktemp("admit") / "tenants.json")
    return make_module_server(path, max_queue=MAX_QUEUE, tenant_metrics=True)


@pytest.fixture
def held(server, monkeypatch):
    """(texts the tokenizer encoded, set when HOLD holds the tokenizer thread, set to release it)."""
    tokenizer = HeldTokenizer(server.engine.tokenizer, monkeypatch)
    yield tokenizer.seen, tokenizer.busy, tokenizer.release
    tokenizer.release.set()


def _complete(server, key: str, prompt, **kwargs) -> str:
    """'ok', or the name of the client error the call raised and the server's reason
    ("ResourceExhausted tenant_quota"; a deadline, the client's own, has none)."""
    with NloraClient(server.target, api_key=key, timeout=60) as client:
        try:
            client.complete(prompt, **{"max_tokens": 1, **kwargs})
        except (ResourceExhausted, DeadlineExceeded, InvalidArgument) as exc:
            return f"{type(exc).__name__} {exc.reason}" if exc.reason else type(exc).__name__
    return "ok"


@pytest.mark.parametrize("key, tenant, admitted, reason", [
    (CAPPED_KEY, "capped-co", QUOTA, "tenant_quota"),  # its max_concurrent_requests
    (FREE_KEY, "free-co", MAX_QUEUE - 1, "queue_full"),  # no quota: the blocker and 3 of it fill --max-queue 4
])
def test_over_its_quota_or_the_queue_a_request_is_resource_exhausted_before_tokenizing(server, held, key, tenant,
                                                                                       admitted, reason):
    seen, busy, release = held
    prompts = [f"burst prompt {i}" for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        blocker = pool.submit(_complete, server, OTHER_KEY, HOLD)
        assert busy.wait(30), "the blocking prompt never reached the tokenizer"
        burst = [pool.submit(_complete, server, key, prompt) for prompt in prompts]
        refused_at_once = wait_for(lambda: sum(f.done() for f in burst) >= 5 - admitted, within=20)
        counts = admission_counts(server)
        release.set()
        outcomes = [f.result() for f in burst]
        assert blocker.result() == "ok"
    assert refused_at_once, "requests over the quota or the queue were not refused while the tokenizer was busy"
    # the reason in the trailing metadata tells the quota from the queue (helper-99's find: the bench could not)
    assert sorted(outcomes) == [f"ResourceExhausted {reason}"] * (5 - admitted) + ["ok"] * admitted
    assert counts == (1 + admitted, {"other-co": 1, tenant: admitted})
    ok = [prompt for prompt, outcome in zip(prompts, outcomes) if outcome == "ok"]
    assert sorted(seen) == sorted([HOLD, *ok])  # the refused prompts were never tokenized
    assert wait_for(lambda: admission_counts(server) == (0, {}))


def _cancelled(server) -> tuple[float, float]:
    """(grpc requests ended cancelled, capped-co's requests ended cancelled) in the server's metrics."""
    registry = server.server.metrics.registry
    return (registry.get_sample_value("nlora_requests_ended_total", {"frontend": "grpc", "outcome": "cancelled"}),
            registry.get_sample_value("nlora_tenant_requests_total", {"tenant": "capped-co", "outcome": "cancelled"})
            or 0.0)


def test_a_deadline_while_waiting_for_the_tokenizer_gives_the_place_back(server, held):
    seen, busy, release = held
    before = _cancelled(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(_complete, server, OTHER_KEY, HOLD)
        assert busy.wait(30)
        assert _complete(server, CAPPED_KEY, "late prompt", timeout=0.5) == "DeadlineExceeded"
        gave_back = wait_for(lambda: admission_counts(server) == (1, {"other-co": 1}))  # while the thread is still held
        counts = admission_counts(server)
        release.set()
        assert blocker.result() == "ok"
    assert gave_back, counts
    assert seen == [HOLD]  # the cancelled request's prompt was never tokenized
    # helper-99's find: counted in no outcome (HTTP counts a client gone then as cancelled)
    assert _cancelled(server) == (before[0] + 1, before[1] + 1)
    assert wait_for(lambda: admission_counts(server) == (0, {}))


@pytest.mark.parametrize("case", ["over the byte bound", "over the context"])
def test_a_prompt_refused_after_reserving_gives_its_place_back(server, case):
    if case == "over the byte bound":
        prompt, kwargs = "x" * (max_prompt_bytes(server.engine.tokenizer, server.engine.max_model_len) + 1), {}
    else:
        # a prompt leaving no room to generate (a max_tokens over the room left is lowered, as vLLM)
        prompt, kwargs = [1] + [30] * (server.engine.max_model_len - 1), {"max_tokens": 100}
    assert [_complete(server, CAPPED_KEY, prompt, **kwargs) for _ in range(QUOTA + 1)] == ["InvalidArgument invalid_argument"] * 3
    assert admission_counts(server) == (0, {})
    assert [_complete(server, CAPPED_KEY, "Hi") for _ in range(QUOTA + 1)] == ["ok"] * (QUOTA + 1)


def test_a_stream_whose_client_reads_nothing_gives_its_place_back_after_the_send_deadline(server, monkeypatch):
    """A client whose HTTP/2 window is 1 KiB and that never reads: the first response (prompt
    logprobs, several KiB) cannot be sent. Before send_deadline.py the handler's write waited for
    ever, holding the request's place in --max-queue and its tenant's quota after the engine had
    finished it (nlora_requests_admitted stayed 1 until the client read)."""
    monkeypatch.setattr(send_deadline, "SEND_SECONDS", 0.5)
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]  # a 1 KiB window
    request = pb.GenerateRequest(text=" ".join(["word"] * 30), sampling=pb.SamplingParams(max_tokens=1, prompt_logprobs=20))
    with grpc.insecure_channel(server.target, options=options) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request, metadata=[("authorization", f"Bearer {CAPPED_KEY}")],
                                                        timeout=60)
        assert wait_for(lambda: admission_counts(server)[0] == 1, within=10)
        gave_back = wait_for(lambda: admission_counts(server) == (0, {}), within=10)
        assert gave_back, f"a client that reads nothing held its request for 10 s: {admission_counts(server)}"
        received = []
        with pytest.raises(grpc.RpcError) as failure:
            received.extend(call)  # what was queued before the status, then the status
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(failure.value.trailing_metadata())[REASON_KEY] == "send_timeout"
    assert "read nothing of it for 0.5 s" in failure.value.details()
    # the stalled response (30 prompt tokens: every one after the first scored), then the status
    assert len(received) == 1 and len(received[0].prompt_logprobs) == 29, received
