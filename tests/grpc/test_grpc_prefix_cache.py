"""Prefix caching and tenant quotas over gRPC: Usage.cached_tokens, GenerateRequest.cache_salt,
per-tenant shares of --max-queue and max_concurrent_requests from the tenants file."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.auth import AuthError, Authenticator, Principal, hash_key
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.metrics import REJECT_REASONS
from nlora_serve.serving.request_policy import cache_salt_of
from nlora_serve.serving.status import QueueFull, http_status_of, status_of

PROMPT = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 can be cached


def _usage(server, key: str, salt: str = "") -> pb.Usage:
    with grpc.insecure_channel(server.target) as channel:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), cache_salt=salt,
                                     sampling=pb.SamplingParams(max_tokens=2))
        last = list(pb_grpc.GenerationStub(channel).Generate(request, metadata=[("authorization", f"Bearer {key}")]))[-1]
    return last.usage


def test_usage_reports_cached_tokens_and_cache_salt_chooses_a_group_within_the_tenant(make_server, tenants_file):
    server = make_server(tenants_file)
    base_co, lora_co = TENANT_KEYS["base-co"], TENANT_KEYS["lora-co"]
    got = [_usage(server, base_co).cached_tokens, _usage(server, base_co).cached_tokens,
           _usage(server, lora_co).cached_tokens, _usage(server, ADMIN_KEY, "g").cached_tokens,
           _usage(server, lora_co, "g").cached_tokens, _usage(server, lora_co, "g").cached_tokens,
           _usage(server, base_co, "g").cached_tokens]
    # the same salt from two principals (4th, 5th; 6th, 7th) never shares a block: a salt chooses
    # a group within its sender's tenant; the same tenant and salt do share (6th)
    assert got == [0, 32, 0, 0, 0, 32, 0]


def test_without_keys_everybody_shares_one_group_and_cache_salt_splits_it(make_server):
    server = make_server()
    got = [_usage(server, "anything").cached_tokens, _usage(server, "other").cached_tokens,
           _usage(server, "anything", "g").cached_tokens, _usage(server, "other", "g").cached_tokens]
    assert got == [0, 32, 0, 32]  # vLLM's behaviour: requests with equal salts (or none) share


def test_cache_salt_over_1024_characters_is_invalid_argument_naming_it(make_server):
    server = make_server()
    assert _usage(server, "any", "é" * 1024).completion_tokens == 2  # characters, not UTF-8 bytes
    with pytest.raises(grpc.RpcError) as err:
        _usage(server, "any", "s" * 1025)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("GenerateRequest.cache_salt must be at most 1024 characters; got 1025")


def test_engine_salts_of_distinct_tenant_and_salt_pairs_differ():
    # names and salts built to collide under a naive "tenant:{name}:{salt}" join
    keys = Authenticator({"h1": Principal("a", False)})
    pairs = [("a", None), ("a", ""), ("a", "x"), ("b", "x"), ("a:x", None), ("a", ":x"), ('a", "x', None),
             ('a"', '"x'), ("a", '["a", null]'), ("a", "tenant:a")]
    salts = [cache_salt_of(Principal(name, False), salt, keys) for name, salt in pairs]
    assert salts[0] == salts[1]  # proto3's unset string is "": no salt
    assert len(set(salts[1:])) == len(pairs) - 1
    assert cache_salt_of(Principal("a", False), "x", keys) == salts[2]  # deterministic
    no_keys = Authenticator(None)
    assert cache_salt_of(Principal("a", False), "x", no_keys) == cache_salt_of(Principal("b", False), "x", no_keys)
    assert cache_salt_of(Principal("a", False), "", no_keys) is None


def test_tenant_shares_of_the_queue_leave_room_for_others():
    admission = Admission(8, tenant_shares=True)
    heavy, light = Principal("heavy", False), Principal("light", False, weight=2.0)
    for _ in range(4):  # alone, a weight-1 tenant gets half the queue: 4 < 1 x (8 - 4) fails at 4
        admission.check(heavy)
        admission.enter("heavy")
    with pytest.raises(QueueFull, match="'heavy' holds 4 requests running or waiting, its share"):
        admission.check(heavy)
    for _ in range(2):  # weight 2: 0 < 2 x (8 - 4), then 1 < 2 x (8 - 5)
        admission.check(light)
        admission.enter("light")
    admission.leave("heavy")
    assert admission.held == {"heavy": 3, "light": 2} and admission.inflight == 5
    assert Admission(8).tenant_shares is False
    fcfs = Admission(2)
    for _ in range(2):
        fcfs.check(heavy)
        fcfs.enter("heavy")
    with pytest.raises(QueueFull, match="server queue is full") as full:
        fcfs.check(light)
    assert http_status_of(full.value) == (429, "queue_full")


def test_a_tenant_over_its_queue_share_has_a_reason_of_its_own():
    """A tenant refused its share of a queue with room (4 of 8 places held) is its own refusal, not
    a busy server: reason tenant_queue_share in the 429 body's code, the gRPC trailer and the metric
    label; queue_full stays the whole queue's (an alert on it means the server is busy)."""
    admission = Admission(8, tenant_shares=True)
    alone = Principal("alone", False)
    for _ in range(4):  # weight 1 alone: held < 1 x free places, 3 < 5 admitted, 4 < 4 not
        admission.check(alone)
        admission.enter("alone")
    with pytest.raises(QueueFull) as refused:
        admission.check(alone)
    assert admission.inflight == 4 < admission.max_queue  # the queue has room: not queue_full
    assert http_status_of(refused.value) == (429, "tenant_queue_share")
    assert status_of(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant_queue_share")
    assert "tenant_queue_share" in REJECT_REASONS
    for _ in range(4):
        admission.enter("others")
    with pytest.raises(QueueFull) as full:
        admission.check(Principal("newcomer", False))
    assert http_status_of(full.value) == (429, "queue_full")


def test_a_heavy_weight_never_takes_the_last_place_of_the_queue():
    """A weight above --max-queue - 1 made weight x free places exceed the free places themselves:
    alone, a weight-300 tenant took all 8 (all 256 of a default queue) and every other tenant got
    queue_full until its backlog drained. The last free place is kept for a tenant holding none."""
    admission = Admission(8, tenant_shares=True)
    heavy, light = Principal("premium", False, weight=300.0), Principal("light", False)
    for _ in range(7):  # 6 < 300 x 2 free; the 8th would be the last free place
        admission.check(heavy)
        admission.enter("premium")
    with pytest.raises(QueueFull, match="'premium' holds 7 requests running or waiting, its share"):
        admission.check(heavy)
    admission.check(light)  # a newcomer finds room
    admission.enter("light")
    with pytest.raises(QueueFull, match="server queue is full"):
        admission.check(heavy)
    alone = Admission(8, tenant_shares=True)  # n choices the same: 7 can be admitted, 8 never could
    seven = alone.reserve(heavy)
    with pytest.raises(RequestError, match="n=8 is 8 requests: more than tenant 'premium' could ever hold in its "
                       "share of the queue"):
        alone.grow(seven, 7, heavy)
    alone.grow(seven, 6, heavy)
    assert (alone.inflight, alone.held) == (7, {"premium": 7})
    one = Admission(1, tenant_shares=True)  # a queue of one place: its tenant holding none takes it
    one.check(heavy)


def test_a_refusal_names_the_callers_own_count_not_the_servers(caplog):
    """Other tenants' traffic is theirs: a refused tenant learns its own count and limits, never the
    server's total nor the queue's bound (beside "full" or "your share now", the bound minus the
    caller's count is the other tenants' count); the operator's INFO log line has them all."""
    admission = Admission(8, tenant_shares=True)
    other, caller = Principal("other", False), Principal("caller", False)
    for _ in range(3):
        admission.check(other)
        admission.enter("other")
    for _ in range(3):  # 0 < 5, 1 < 4, 2 < 3 free places; then 3 ≥ 2
        admission.check(caller)
        admission.enter("caller")
    caplog.set_level(logging.INFO, logger="nlora_serve.serving.admission")
    with pytest.raises(QueueFull) as refused:
        admission.check(caller)
    assert str(refused.value) == ("'caller' holds 3 requests running or waiting, its share of the server's queue "
                                  "(its weight x the free places, so that other tenants always find room); retry "
                                  "when one ends, or with backoff")
    assert "tenant_queue_share: 'caller' refused 1 place(s), holding 3, its share 2 of the 2 free places of " \
           "--max-queue 8 " \
           "(weight 1)" in caplog.text
    full = Admission(4)
    for _ in range(3):
        full.check(other)
        full.enter("other")
    full.check(caller)
    full.enter("caller")
    caplog.clear()
    with pytest.raises(QueueFull) as refused:
        full.check(caller)
    assert str(refused.value) == "server queue is full (the server is busy); retry with backoff"
    assert "queue_full: 'caller' refused 1 place(s), 4 of --max-queue 4 held (1 by it)" in caplog.text


def test_max_concurrent_requests_quota():
    admission = Admission(100)
    capped = Principal("capped", False, max_concurrent_requests=2)
    for _ in range(2):
        admission.check(capped)
        admission.enter("capped")
    with pytest.raises(QueueFull, match="'capped' has 2 requests running or waiting, its max_concurrent_requests") \
            as refused:
        admission.check(capped)
    # a 429 counted apart from a full queue (h99): an alert on queue_full must mean the server is busy,
    # not that one tenant is at its own cap
    assert http_status_of(refused.value) == (429, "tenant_quota")
    assert status_of(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant_quota")
    admission.leave("capped")
    admission.check(capped)


def test_tenants_file_weights_and_quotas(tmp_path):
    path = tmp_path / "tenants.json"
    entry = {"name": "acme", "key_sha256": hash_key("k"), "weight": 3, "max_concurrent_requests": 5}
    path.write_text(json.dumps({"tenants": [entry, {"name": "plain", "key_sha256": hash_key("p")}]}))
    auth = Authenticator.from_file(path)
    acme = auth.authenticate([("authorization", "Bearer k")])
    assert (acme.weight, acme.max_concurrent_requests) == (3.0, 5)
    assert auth.weights() == {"acme": 3.0}
    for bound in (0.001, 1000):  # the range's ends are weights
        path.write_text(json.dumps({"tenants": [{**entry, "weight": bound}]}))
        assert Authenticator.from_file(path).weights() == {"acme": bound}
    for field, value, says in (("weight", 0, "weight must be a positive number"),
                               ("weight", True, "weight must be a positive number"),
                               # two at 1e308 summed to inf (every fair share NaN); 5e-324 had a share of ~0
                               ("weight", 1e308, "weight must be a positive number from 0.001 to 1000"),
                               ("weight", 5e-324, "weight must be a positive number from 0.001 to 1000"),
                               ("max_concurrent_requests", 0, "max_concurrent_requests must be a positive integer"),
                               ("max_concurrent_requests", 1.5, "max_concurrent_requests must be a positive integer"),
                               ("weigth", 2, r"unknown field\(s\) 'weigth'")):
        path.write_text(json.dumps({"tenants": [{**entry, field: value}]}))
        with pytest.raises(AuthError, match=f"tenants\\[0\\].*{says}"):
            Authenticator.from_file(path)


def test_serve_flags_prefix_caching_and_scheduling_policy(tmp_path):
    import argparse

    from nlora_serve.serving.commands import serve as serve_cli
    from nlora_serve.serving.commands import serve_build

    def configs(*flags):
        parser = argparse.ArgumentParser()
        serve_cli.add_serve_arguments(parser)
        return serve_build._configs(parser.parse_args(["--adapter-dir", str(tmp_path), *flags]))

    server, engine = configs()
    assert engine.enable_prefix_caching is True and engine.scheduler.policy == "fcfs"
    assert server.tenant_queue_shares is False
    server, engine = configs("--no-enable-prefix-caching", "--tenants-file", "t.json")
    assert engine.enable_prefix_caching is False and engine.scheduler.policy == "fair"
    assert server.tenant_queue_shares is True
    server, engine = configs("--tenants-file", "t.json", "--scheduling-policy", "fcfs")
    assert engine.scheduler.policy == "fcfs" and server.tenant_queue_shares is False
