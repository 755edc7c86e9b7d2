"""Greedy tokens streamed through a real server equal the cases' recorded transformers references."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from grpc_harness import matches_reference
from nlora_serve.client import AsyncNloraClient, NloraClient

CASES = Path(__file__).parents[1] / "data" / "cases"
TENANTS = {"inttune-nystrom-tied": "tied-co", "lora-rslora": "lora-co"}


def _refs(name: str) -> list[dict]:
    path = CASES / "BASE_GREEDY.json" if name is None else CASES / name / "case.json"
    return json.loads(path.read_text())["references"]


async def _stream_all(target: str, jobs: list[tuple[str | None, str, dict]]):
    """Every job concurrently (one mixed batch), each with its own tenant's key."""
    async def one(adapter, key, ref):
        async with AsyncNloraClient(target, api_key=key, timeout=120) as client:
            n = len(ref["greedy_token_ids"])
            return [d async for d in client.generate(ref["prompt_token_ids"], adapter=adapter,
                                                     max_tokens=n, min_tokens=n)]
    return await asyncio.gather(*(one(*job) for job in jobs))


def test_base_and_two_uploaded_tenants_match_the_references(make_server, tenants_file):
    server = make_server(tenants_file)
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        uploaded = {name: admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10) for name in TENANTS}
    assert uploaded["inttune-nystrom-tied"].tied and uploaded["inttune-nystrom-tied"].flavour == "inttune-tied"
    assert not uploaded["lora-rslora"].tied and all(info.version == 1 for info in uploaded.values())
    jobs = [(None, TENANT_KEYS["base-co"], ref) for ref in _refs(None)]
    jobs += [(name, TENANT_KEYS[tenant], ref) for name, tenant in TENANTS.items() for ref in _refs(name)]
    results = asyncio.run(_stream_all(server.target, jobs))
    for (adapter, _, ref), deltas in zip(jobs, results):
        tokens = [t for d in deltas for t in d.token_ids]
        assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"]), adapter
        want = uploaded[adapter] if adapter else None
        refs = {(d.adapter, d.adapter_version, d.content_hash) for d in deltas}
        assert refs == {(want.name, 1, want.content_hash) if want else ("", 0, "")}
        last = deltas[-1]
        assert last.finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
        assert last.usage.prompt_tokens == len(ref["prompt_token_ids"])
        assert last.usage.completion_tokens == len(ref["greedy_token_ids"])
        assert 0 < last.usage.time_to_first_token_s <= last.usage.duration_s
    assert server.engine.stats()["kv_blocks_used"] == 0


def test_chat_prompt_uses_the_chat_template(make_server, tokenizer):
    server = make_server()
    ref = _refs(None)[0]  # its prompt is the chat template applied to one user message
    text = tokenizer.decode(ref["prompt_token_ids"])
    user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    with NloraClient(server.target, timeout=60) as client:
        _, deltas = client.complete(messages=[{"role": "user", "content": user}], max_tokens=8, min_tokens=8)
    assert tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False) == ref["prompt_token_ids"]
    assert deltas[-1].usage.prompt_tokens == len(ref["prompt_token_ids"])
    tokens = [t for d in deltas for t in d.token_ids]
    assert matches_reference(tokens, ref["greedy_token_ids"][:8], ref["top2_logit_margins"][:8])
