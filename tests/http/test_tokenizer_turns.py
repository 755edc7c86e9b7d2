"""One tenant cannot hold the front ends' tokenizer thread (round-four hostile review).

Quotas and fair shares apply once a prompt is tokenized, so 16 concurrent 663k-emoji prompts of one
tenant (1.9 s each, refused in the end) queued ahead of every other tenant on the one tokenizer
thread, and another tenant's "Hi" waited 20-47 s. Prompts are now bounded in UTF-8 bytes (0.4 s of
tokenizing at most) and each tenant's prompts go to the thread one at a time (TokenizerTurns)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import pytest
import requests

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from http_harness import base_url
from nlora_serve.serving.tokenizer_turns import TokenizerTurns


def _complete(server, key: str, prompt: str) -> int:
    body = {"model": server.server.generation.info.model, "prompt": prompt, "max_tokens": 1}
    return requests.post(f"{base_url(server)}/completions", data=json.dumps(body), timeout=60,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}).status_code


def test_another_tenant_is_tokenized_before_a_busy_tenants_queue(http_server, monkeypatch):
    tokenizer = http_server.engine.tokenizer
    original, order = tokenizer.encode, []
    busy, release = threading.Event(), threading.Event()

    def encode(text, *args, **kwargs):
        order.append(text)
        if len(order) == 1:  # the heavy tenant's first prompt holds the thread until released
            busy.set()
            release.wait(30)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    heavy = [f"heavy prompt {i}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        try:
            first = pool.submit(_complete, http_server, ADMIN_KEY, heavy[0])
            assert busy.wait(30), "the first prompt never reached the tokenizer"
            rest = [pool.submit(_complete, http_server, ADMIN_KEY, p) for p in heavy[1:]]
            time.sleep(0.5)  # the heavy tenant's other prompts are queued by now
            light = pool.submit(_complete, http_server, TENANT_KEYS["base-co"], "light prompt")
            time.sleep(0.5)
        finally:
            release.set()
        assert [f.result() for f in [first, *rest, light]] == [200] * 5
    # the light tenant's prompt is tokenized right after the job that held the thread, not after
    # the heavy tenant's whole queue (which a single FIFO thread did: order heavy 0, 1, 2, 3, light)
    assert order[:2] == [heavy[0], "light prompt"], order
    assert sorted(order[2:]) == heavy[1:]


def test_a_cancelled_job_still_running_keeps_its_tenants_turn():
    # a hostile tester's reading: a client gone while its prompt was on the thread freed its tenant's
    # turn, so the tenant's next prompt queued beside the running one, two ahead of other tenants
    started, release, order = threading.Event(), threading.Event(), []

    def job(name: str) -> str:
        order.append(name)
        if name == "a1":
            started.set()
            release.wait(30)
        return name

    async def scenario() -> None:
        turns = TokenizerTurns()
        a1 = asyncio.create_task(turns.run("a", job, "a1"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        a1.cancel()  # a1 is running on the thread: it cannot stop
        await asyncio.sleep(0.05)
        a2 = asyncio.create_task(turns.run("a", job, "a2"))
        await asyncio.sleep(0.05)
        b1 = asyncio.create_task(turns.run("b", job, "b1"))
        await asyncio.sleep(0.05)
        release.set()
        assert await b1 == "b1" and await a2 == "a2"
        with pytest.raises(asyncio.CancelledError):
            await a1

    asyncio.run(scenario())
    assert order == ["a1", "b1", "a2"], order
