"""Greedy tokens over the OpenAI API, driven by the official client, equal the cases' recorded
transformers references (fp32): completions and chat, whole and streamed, for the base model and
two tenants, all in one mixed batch."""

from __future__ import annotations

import asyncio
import itertools

from grpc_harness import TENANT_KEYS, matches_reference
from http_harness import TENANTS, async_client, references

MODES = list(itertools.product((False, True), (False, True)))  # (chat, stream)


def _user_text(tokenizer, prompt_ids: list[int]) -> str:
    """The user message the reference prompt was rendered from (its chat template holds one)."""
    return tokenizer.decode(prompt_ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]


async def _ask(server, tokenizer, model: str, key: str, ref: dict, chat: bool, stream: bool):
    """(token ids, text, finish_reason, usage) of one greedy request for the reference's tokens."""
    n = len(ref["greedy_token_ids"])
    common = dict(model=model, max_tokens=n, temperature=0, stream=stream,
                  extra_body={"min_tokens": n, "return_tokens_as_token_ids": True})
    if stream:
        common["stream_options"] = {"include_usage": True}
    async with async_client(server, key) as client:
        if chat:
            messages = [{"role": "user", "content": _user_text(tokenizer, ref["prompt_token_ids"])}]
            answer = await client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=0, **common)
        else:
            answer = await client.completions.create(prompt=ref["prompt_token_ids"], logprobs=0, **common)
        chunks = [c async for c in answer] if stream else [answer]
    return _collect(chunks, chat, stream)


def _collect(chunks: list, chat: bool, stream: bool):
    usage = chunks[-1].usage
    if stream:  # include_usage: the last chunk has no choices; usage nowhere else
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        chunks = chunks[:-1]
    choices = [c.choices[0] for c in chunks]
    if chat:
        text = "".join((ch.delta.content or "") if stream else ch.message.content for ch in choices)
        tokens = [e.token for ch in choices if ch.logprobs for e in ch.logprobs.content]
    else:
        text = "".join(ch.text for ch in choices)
        tokens = [t for ch in choices if ch.logprobs for t in ch.logprobs.tokens]
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.removeprefix("token_id:")) for t in tokens], text, choices[-1].finish_reason, usage


def test_chat_and_completions_streamed_and_whole_match_the_references(http_server, tokenizer):
    base_name = http_server.server.generation.info.model
    models = [(base_name, None, "base-co")] + [(name, name, tenant) for name, tenant in TENANTS.items()]
    jobs = [(model, TENANT_KEYS[tenant], references(case)[i % 2], chat, stream)
            for model, case, tenant in models for i, (chat, stream) in enumerate(MODES)]

    async def run_all():
        return await asyncio.gather(*(_ask(http_server, tokenizer, *job) for job in jobs))

    for (model, _, ref, chat, stream), (tokens, text, finish, usage) in zip(jobs, asyncio.run(run_all())):
        what = (model, chat, stream)
        assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"]), what
        assert text == tokenizer.decode(tokens, skip_special_tokens=True), what
        assert finish == "length", what
        # the chat template renders the reference prompt exactly: same prompt token count
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref["prompt_token_ids"]), len(tokens)), what
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert http_server.engine.stats()["kv_blocks_used"] == 0
