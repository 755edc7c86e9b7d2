"""``n`` choices and a batch's prompts run on one adapter version, across a hot swap, as vLLM and
LoRAX serve them: a prompt's other choices are queued after its choice 0's first delta
(serving/http_api/choices.py), so a swap can fall in between; every choice runs on the version held
before the first was queued, the response names it, and the superseded version is freed once its
last choice ends. References: the tied case's recorded transformers greedy tokens (fp32, merged
weights) for the version uploaded, the admin calls' acknowledged versions and hashes, hand-counted
hold events for the fake streams."""

from __future__ import annotations

import asyncio

import openai
import pytest
import safetensors.torch

from grpc_harness import ADMIN_KEY, TENANT_KEYS, matches_reference
from http_harness import CASES, client, references
from nlora_serve.client import NloraClient
from nlora_serve.engine.api import RequestOutput, RequestStream
from nlora_serve.errors import NloraError
from nlora_serve.serving.http_api import generate
from nlora_serve.serving.http_api.choices import start_choices

TIED = "inttune-nystrom-tied"
KEY = TENANT_KEYS["tied-co"]


# -- start_choices over fake streams: when the caller's hold on the version is let go ---------------

def _run(n: int, num_prompts: int = 1, fail_at: int | None = None, close_early: bool = False) -> list[str]:
    """Drain start_choices over fake two-delta streams (``close_early``: close it after its first
    delta); the events in order: "start i", "delta i", "let go", "raised"; ``fail_at``: that
    choice's start raises."""
    events: list[str] = []

    def start(index: int):
        if index == fail_at:
            raise NloraError("no slot")
        events.append(f"start {index}")

        async def stream():
            for step in range(2):
                await asyncio.sleep(0)
                yield RequestOutput("r", "x", [5], "length" if step else None, 3, step + 1)

        return stream()

    async def drain():
        merged = await start_choices(start, n, num_prompts, lambda: events.append("let go"))
        try:
            async for out in merged:
                events.append(f"delta {out.index}")
                if close_early:
                    break
        finally:
            await merged.aclose()

    try:
        asyncio.run(drain())
    except NloraError:
        events.append("raised")
    return events


def test_the_hold_is_let_go_once_every_choice_is_queued():
    events = _run(n=3)
    assert events.count("let go") == 1
    # queued after choice 0's first delta, let go at once, before the stream ends
    assert events[:5] == ["start 0", "start 1", "start 2", "let go", "delta 0"]
    assert sorted(e for e in events if e.startswith("delta")) == [f"delta {i}" for i in (0, 0, 1, 1, 2, 2)]


def test_a_batch_lets_go_once_every_prompts_choices_are_queued():
    events = _run(n=2, num_prompts=2)
    assert events.count("let go") == 1
    assert events.index("let go") > max(events.index("start 1"), events.index("start 3"))
    assert events.index("let go") < len(events) - 1  # deltas still came after it
    assert _run(n=1, num_prompts=3)[:4] == ["start 0", "start 1", "start 2", "let go"]  # all queued at once


def test_the_hold_is_let_go_when_queueing_fails_or_the_stream_closes_first():
    assert _run(n=2, num_prompts=2, fail_at=2) == ["start 0", "let go", "raised"]
    # closed after prompt 0's first delta: prompt 1's choice 1 was never queued
    assert _run(n=2, num_prompts=2, close_early=True) == ["start 0", "start 2", "start 1", "delta 0", "let go"]
    assert _run(n=3, fail_at=2)[-2:] == ["let go", "raised"]  # choice 2 refused: the request aborts


def test_closed_before_its_first_delta_the_hold_is_let_go_and_the_queued_choices_aborted():
    """A front end that gives up before reading (a client gone while the first delta was awaited)
    closes the merged stream unread: an async generator's aclose runs nothing before its first
    __anext__, so the hold kept its version (a superseded one's memory too) for good and each
    prompt's choice 0 ran to its end. Now each is aborted and the hold let go, once."""
    events: list[str] = []

    def start(index: int) -> RequestStream:
        events.append(f"start {index}")
        return RequestStream(f"choice-{index}", asyncio.Queue(), lambda rid: events.append(f"abort {rid}"))

    async def close_unread():
        merged = await start_choices(start, 2, 2, lambda: events.append("let go"))
        await merged.aclose()
        await merged.aclose()  # closing again does nothing
        with pytest.raises(StopAsyncIteration):
            await anext(merged)

    asyncio.run(close_unread())
    assert events == ["start 0", "start 2", "let go", "abort choice-0", "abort choice-2"]


# -- a real server: a hot swap between choice 0's first delta and the other choices ----------------

def _n_scaled(server, factor: float) -> bytes:
    stored = server.engine.adapters.registry.get(TIED).path / "adapter_model.safetensors"
    n = safetensors.torch.load_file(stored)
    return safetensors.torch.save({k: (t * factor).contiguous() for k, t in n.items()})


def _swap_before(monkeypatch, server, index: int) -> list:
    """Hot-swap the tenant's N (x 1.5) just before choice ``index`` is queued in the engine; the
    swap's acknowledged version is appended to the returned list."""
    swapped: list = []
    payload = _n_scaled(server, 1.5)
    queue = generate.start_request

    def start_request(engine, prompt, params, engine_id, *args):
        if engine_id.endswith(f"/{index}") and not swapped:
            swapped.append(server.engine.adapters.swap(TIED, payload))
        return queue(engine, prompt, params, engine_id, *args)

    monkeypatch.setattr(generate, "start_request", start_request)
    return swapped


def _choice_tokens(answer, stream: bool) -> tuple[dict[int, list[int]], set[str | None], dict[int, str]]:
    """(index -> token ids, the system_fingerprints seen, index -> finish_reason) of a completion."""
    chunks = list(answer) if stream else [answer]
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            tokens.setdefault(c.index, []).extend(int(t.removeprefix("token_id:")) for t in c.logprobs.tokens)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return tokens, {c.system_fingerprint for c in chunks}, finish


# 8 tokens tell the versions apart: the swapped version's greedy tokens leave the reference at the
# second (each test checks it on its own server, after the request)
@pytest.mark.parametrize("num_prompts, n, swap_at, length", [
    (1, 3, 1, 8),  # between choice 0's first delta and choices 1, 2
    (1, 3, 1, 1),  # choice 0 has ended (its one token) when the others are queued: only the hold keeps v1
    (2, 2, 1, 8),  # a batch: prompt 0's choice 1
    (2, 2, 2, 8),  # a batch: prompt 1's choice 0, queued right after prompt 0's
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_every_choice_runs_on_the_version_held_before_a_swap(make_http_server, monkeypatch, num_prompts, n,
                                                             swap_at, length, stream):
    server = make_http_server()
    manager = server.engine.adapters
    with NloraClient(server.target, api_key=ADMIN_KEY, timeout=60) as admin:
        first = admin.upload_adapter(TIED, CASES / TIED)
    old = manager.registry.get(TIED)
    refs = references(TIED)[:num_prompts]
    swapped = _swap_before(monkeypatch, server, swap_at)
    # temperature 1 with top_k 1 samples the argmax: greedy, which n > 1 may not ask for by name
    raw = client(server, KEY).completions.with_raw_response.create(
        model=TIED, prompt=[r["prompt_token_ids"] for r in refs] if num_prompts > 1 else refs[0]["prompt_token_ids"],
        n=n, max_tokens=length, temperature=1.0, logprobs=0, stream=stream,
        extra_body={"top_k": 1, "min_tokens": length, "return_tokens_as_token_ids": True})
    tokens, fingerprints, finish = _choice_tokens(raw.parse(), stream)

    (second,) = swapped  # the swap happened, while the request ran
    assert (second.version, second.content_hash != first.content_hash) == (first.version + 1, True)
    assert sorted(tokens) == list(range(num_prompts * n))
    for index, got in tokens.items():
        ref = refs[index // n]
        assert matches_reference(got, ref["greedy_token_ids"][:length], ref["top2_logit_margins"]), (index, got)
        assert finish[index] == "length"
    assert (raw.headers["x-adapter-version"], raw.headers["x-adapter-hash"]) == (str(first.version),
                                                                                  first.content_hash)
    assert fingerprints == {f"{TIED}:v{first.version}:{first.content_hash[:12]}"}

    after = client(server, KEY).completions.with_raw_response.create(
        model=TIED, prompt=refs[0]["prompt_token_ids"], max_tokens=2, temperature=0, logprobs=0,
        extra_body={"min_tokens": 2, "return_tokens_as_token_ids": True})
    assert (after.headers["x-adapter-version"], after.headers["x-adapter-hash"]) == (str(second.version),
                                                                                   second.content_hash)
    # the swapped version answers otherwise: the tokens checked above tell the versions apart
    on_new = _choice_tokens(after.parse(), False)[0][0]
    assert not matches_reference(on_new, refs[0]["greedy_token_ids"][:2], refs[0]["top2_logit_margins"]), on_new
    # the superseded version is let go: no pin, no hold, its tied slot and its folder freed
    assert (old.refcount, old.holds, old.freed, old.pool, old.slot) == (0, 0, True, None, None)
    assert manager.holders(TIED) == 0 and manager.requests_of(old, "tied-co") == 0
    assert sum(pool.used for pool in manager.residency.tied_pools.values()) == 1  # the new version's only
    assert manager.registry.store.versions(TIED) == [second.version]
    assert server.engine.stats()["kv_blocks_used"] == 0


def _unload_before(monkeypatch, server, index: int, force: bool, load_again: bool = False) -> None:
    """Unload the tenant (``force`` or not; ``load_again``: then load it back, a new version) just
    before choice ``index`` is queued in the engine."""
    queue = generate.start_request

    def start_request(engine, prompt, params, engine_id, *args):
        if engine_id.endswith(f"/{index}"):
            server.engine.unload_adapter(TIED, force=force)
            if load_again:
                server.engine.adapters.register_dir(TIED, CASES / TIED)
        return queue(engine, prompt, params, engine_id, *args)

    monkeypatch.setattr(generate, "start_request", start_request)


@pytest.mark.parametrize("load_again", [False, True], ids=["unloaded", "loaded-again"])
def test_a_forced_unload_before_the_other_choices_are_queued_aborts_the_request(make_http_server, monkeypatch,
                                                                                load_again):
    """A forced unload aborts every request on the adapter: choices queued after it on the held
    version must not run. Choice 0 (one token) has ended by then: the 409 is the other choices',
    naming the version unloaded, also when the name was loaded again meanwhile (it read 'is not
    registered' then)."""
    server = make_http_server()
    manager = server.engine.adapters
    with NloraClient(server.target, api_key=ADMIN_KEY, timeout=60) as admin:
        admin.upload_adapter(TIED, CASES / TIED)
    old = manager.registry.get(TIED)
    _unload_before(monkeypatch, server, 1, force=True, load_again=load_again)
    with pytest.raises(openai.ConflictError) as err:
        client(server, KEY).completions.create(model=TIED, prompt="Colours:", n=3, max_tokens=1, temperature=1.0)
    assert err.value.body["message"] == (f"choice 1 of 3 could not be queued: adapter '{TIED}' v{old.version} was "
                                         "unloaded by an operator (UnloadAdapter force=true) while this response's "
                                         "requests were being queued")
    assert (old.refcount, old.holds, old.freed, old.slot) == (0, 0, True, None)
    assert manager.holders(TIED) == 0 and server.engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_unload_without_force_lets_the_request_finish_on_its_version(make_http_server, monkeypatch, stream):
    """Without force an unload lets in-flight requests finish (DESIGN §3, `/v1/unload_lora_adapter`):
    the choices still to be queued of an admitted n=3 request run on the held version (they were a
    409 'choice 1 of 3 could not be queued'); new requests are refused, and the version is freed
    after its last choice, its folder kept for a load."""
    server = make_http_server()
    manager = server.engine.adapters
    with NloraClient(server.target, api_key=ADMIN_KEY, timeout=60) as admin:
        first = admin.upload_adapter(TIED, CASES / TIED)
    old = manager.registry.get(TIED)
    ref = references(TIED)[0]
    _unload_before(monkeypatch, server, 1, force=False)
    raw = client(server, KEY).completions.with_raw_response.create(
        model=TIED, prompt=ref["prompt_token_ids"], n=3, max_tokens=8, temperature=1.0, logprobs=0, stream=stream,
        extra_body={"top_k": 1, "min_tokens": 8, "return_tokens_as_token_ids": True})
    tokens, fingerprints, finish = _choice_tokens(raw.parse(), stream)

    assert sorted(tokens) == [0, 1, 2] and set(finish.values()) == {"length"}
    for index, got in tokens.items():
        assert matches_reference(got, ref["greedy_token_ids"][:8], ref["top2_logit_margins"]), (index, got)
    assert raw.headers["x-adapter-version"] == str(first.version)
    assert fingerprints == {f"{TIED}:v{first.version}:{first.content_hash[:12]}"}
    with pytest.raises(openai.NotFoundError, match="was unloaded by an operator"):
        client(server, KEY).completions.create(model=TIED, prompt="Colours:", max_tokens=1)
    assert (old.refcount, old.holds, old.freed, old.slot) == (0, 0, True, None)
    assert manager.holders(TIED) == 0 and server.engine.stats()["kv_blocks_used"] == 0
    assert manager.registry.store.versions(TIED) == [first.version]
