"""Prefix caching over HTTP: OpenAI's usage.prompt_tokens_details.cached_tokens, per-tenant sharing
groups and vLLM's cache_salt within them (at most 1024 characters), the per-frontend prefix-cache
counters."""

from __future__ import annotations

import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import client, scrape

PROMPT = ("The keeper of the lighthouse wrote in his log every evening: the wind, the ships that "
          "passed, the colour of the sea and the birds on the rocks. On the last day of the year he wrote")


def test_cached_tokens_per_tenant_group_and_salt_within_the_tenant(make_http_server):
    server = make_http_server(metrics_port=0)
    base = server.server.generation.info.model
    n = len(server.engine.prompt_ids(PROMPT))
    full = (n - 1) // 16 * 16  # every full 16-token block but the one holding the last token
    assert full >= 32

    def cached(tenant: str, salt: str | None = None) -> int:
        extra = {"cache_salt": salt} if salt is not None else None
        answer = client(server, TENANT_KEYS[tenant]).completions.create(
            model=base, prompt=PROMPT, max_tokens=2, temperature=0, extra_body=extra)
        assert answer.usage.prompt_tokens == n
        return answer.usage.prompt_tokens_details.cached_tokens

    got = [cached("base-co"), cached("base-co"), cached("lora-co"), cached("lora-co", "team"),
           cached("base-co", "team"), cached("lora-co", "team"), cached("base-co", '["lora-co", null]'),
           cached("base-co", "tenant:lora-co")]
    # another tenant's prefix is never visible (3rd); the same salt sent by another tenant shares
    # nothing (5th: a salt chooses a group within the sender's tenant, so a tenant that salts per
    # end user cannot be probed by a tenant guessing the salt); the same tenant and salt share
    # (6th); no salt can name another tenant's own group (7th, 8th)
    assert got == [0, full, 0, 0, 0, full, 0, 0]
    samples = scrape(server)
    http = (("frontend", "http"),)
    assert samples[("nlora_prefix_cache_queries_total", http)] == 8 * n
    assert samples[("nlora_prefix_cache_hits_total", http)] == 2 * full
    assert samples[("nlora_prefix_cache_hits_total", (("frontend", "grpc"),))] == 0


@pytest.mark.parametrize("chat", [False, True])
def test_cache_salt_over_1024_characters_is_refused_naming_it(make_http_server, chat):
    server = make_http_server()
    api, base = client(server, TENANT_KEYS["base-co"]), server.server.generation.info.model

    def create(salt: str):
        if chat:
            return api.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                               extra_body={"cache_salt": salt})
        return api.completions.create(model=base, prompt="Hi", max_tokens=1, extra_body={"cache_salt": salt})

    assert create("é" * 1024).usage.completion_tokens == 1  # the bound counts characters, not UTF-8 bytes
    with pytest.raises(openai.BadRequestError) as err:
        create("s" * 1025)
    assert err.value.body["param"] == "cache_salt"
    assert err.value.body["message"].startswith("cache_salt must be at most 1024 characters; got 1025")
