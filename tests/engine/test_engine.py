"""The engine interface: streaming, abort and early close free every block, stops, seeds, errors."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.api import EngineDead, EngineError
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence

PROMPT = "Write a long story about a lighthouse keeper."
# the engine step by step, and with async scheduling (step n+1 launched before step n's tokens are read)
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])


def chat(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)


@OVERLAP
def test_abort_mid_decode_returns_every_block(overlap, make_engine):
    engine = make_engine(async_scheduling=overlap)
    long_run = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario():
        other = engine.add_request(chat(engine, "Count to fifty."), long_run, request_id="other")
        stream = engine.add_request(chat(engine, PROMPT), long_run, request_id="victim")
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                engine.abort("victim")
        async for out in other:  # the close below aborts it too
            if out.completion_tokens >= 2:
                break
        await other.aclose()
        return seen

    seen = asyncio.run(scenario())
    assert seen[-1].finish_reason == "abort" and all(o.finish_reason is None for o in seen[:-1])
    assert 3 <= len(seen) < 200
    for _ in range(200):  # the early close reaches the step thread asynchronously
        if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_closing_a_stream_never_read_or_cancelled_while_waiting_aborts_it(make_engine):
    # An async generator's aclose() before its first read does nothing; ours must still abort.
    engine = make_engine()
    long_run = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario():
        unread = engine.add_request(chat(engine, PROMPT), long_run, request_id="unread")
        await unread.aclose()
        waiting = engine.add_request(chat(engine, PROMPT), long_run, request_id="waiting")
        reader = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        with pytest.raises(StopAsyncIteration):  # a closed stream yields nothing more
            await anext(unread)

    asyncio.run(scenario())
    for _ in range(300):
        if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] + engine.stats()["waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generation_tokens"] < 2 * 200  # neither ran to its 200 tokens


@OVERLAP
def test_stream_deltas_join_to_the_generated_text(overlap, make_engine):
    engine = make_engine(async_scheduling=overlap)
    params = SamplingParams(max_tokens=20, temperature=0.0)

    async def collect():
        return [out async for out in engine.add_request(chat(engine, PROMPT), params)]

    deltas = asyncio.run(collect())
    ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert deltas[-1].finish_reason in ("stop", "length") and deltas[-1].completion_tokens == len(ids)


@OVERLAP
def test_stop_string_and_stop_token(overlap, make_engine):
    engine = make_engine(async_scheduling=overlap)
    ids = chat(engine, "What is the capital of France?")
    free = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
    word = free.text.split()[2]
    cut = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, stop=(word,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(word)]
    second = free.token_ids[1]
    by_id = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(second,)))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:2]
    assert engine.stats()["kv_blocks_used"] == 0


@OVERLAP
def test_stop_strings_wait_for_min_tokens(overlap, make_engine):
    """A stop string counts only where it ends past the text of the first min_tokens tokens (vLLM's
    rule); the reference cut is computed by hand from a greedy run without stop strings."""
    engine = make_engine(async_scheduling=overlap)
    ids = chat(engine, "What is the capital of France?")
    free = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    min_tokens = 4
    boundary = len(engine.tokenizer.decode(free.token_ids[:min_tokens]))
    assert " " in free.text[:boundary]  # without min_tokens a space would stop it earlier
    straddling = free.text[boundary - 1:boundary + 1]  # its last character comes after the boundary
    stops = [" ", straddling]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(s,), min_tokens=min_tokens)
              for s in stops]
    for stop, out in zip(stops, engine.generate([ids, ids], params)):
        cut = free.text.find(stop, boundary - len(stop) + 1)  # the first occurrence ending past the boundary
        assert cut >= 0 and out.finish_reason == "stop" and out.text == free.text[:cut], (stop, out.text)
        # the tokens up to the one whose text completes the stop string
        end = next(k for k in range(len(free.token_ids) + 1)
                   if len(engine.tokenizer.decode(free.token_ids[:k])) >= cut + len(stop))
        assert out.token_ids == free.token_ids[:end] and end > min_tokens
    assert engine.stats()["kv_blocks_used"] == 0


@OVERLAP
def test_seeded_sampling_reproducible_across_batches(overlap, make_engine):
    engine = make_engine(async_scheduling=overlap)
    ids = chat(engine, PROMPT)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate([ids], seeded)[0]
    crowd = engine.generate([ids, ids, ids], [SamplingParams(max_tokens=12, temperature=1.0), seeded,
                                               SamplingParams(max_tokens=12, temperature=0.0)])
    assert crowd[1].token_ids == alone.token_ids
    other = engine.generate([ids], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99))[0]
    assert other.token_ids != alone.token_ids


@OVERLAP
def test_logprobs_match_the_model_distribution(overlap, make_engine, hf_model):
    engine = make_engine(async_scheduling=overlap)
    ids = chat(engine, PROMPT)
    out = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))[0]
    with torch.inference_mode():
        want = hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = want.topk(3)
    got = out.logprobs[0]
    assert set(got) == set(top.indices.tolist())
    for token, value in zip(top.indices.tolist(), top.values.tolist()):
        assert got[token] == pytest.approx(value, abs=1e-3)


def test_invalid_requests_rejected_at_once(make_engine):
    engine = make_engine(max_model_len=64, num_blocks=8)
    with pytest.raises(RequestError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match=r"\[0, 49152\)"):
        engine.generate([[49152]], SamplingParams())
    # a stop id past the vocabulary is refused at admission: min_tokens bans stop ids by indexing
    # the logits, which used to fail the step of every request in the batch
    with pytest.raises(RequestError, match=r"stop_token_ids must be in \[0, 49152\); got 49152") as err:
        engine.generate([[5]], SamplingParams(min_tokens=1, stop_token_ids=(3, 49152)))
    assert err.value.param == "stop_token_ids"
    # vLLM's rule and words: a prompt must leave room for one generated token (64 >= 64)
    with pytest.raises(RequestError) as err:
        engine.generate([[5] * 64], SamplingParams(max_tokens=1))
    assert str(err.value) == ("This model's maximum context length is 64 tokens. However, you requested 64 tokens "
                              "in the messages. Please reduce the length of the messages.")
    # min_tokens over the room left cannot be met: refused, as vLLM refuses it once it lowered max_tokens
    with pytest.raises(RequestError, match="min_tokens 5 is more than the 4 tokens of context left") as err:
        engine.generate([[5] * 60], SamplingParams(max_tokens=5, min_tokens=5))
    assert err.value.param == "min_tokens"
    assert engine.stats()["kv_blocks_used"] == engine.stats()["waiting"] == 0


def test_max_tokens_over_the_context_is_lowered_to_it(make_engine):
    """vLLM 0.32's get_max_tokens: prompt + max_tokens over max_model_len runs with max_tokens
    lowered to max_model_len - prompt (60 + 5 > 64: 4 tokens), ending with "length", the tokens of
    the request that asks for exactly the room left."""
    engine = make_engine(max_model_len=64, num_blocks=8)
    greedy = dict(temperature=0.0, ignore_eos=True)
    over, exact = engine.generate([[5] * 60, [5] * 60], [SamplingParams(max_tokens=4096, **greedy),
                                                         SamplingParams(max_tokens=4, **greedy)])
    assert over.finish_reason == exact.finish_reason == "length"
    assert over.completion_tokens == 64 - 60 == exact.completion_tokens
    assert over.token_ids == exact.token_ids
    one = engine.generate([[5] * 63], SamplingParams(max_tokens=5, **greedy))[0]  # room for one token
    assert one.finish_reason == "length" and one.completion_tokens == 1


def test_cache_too_small_for_max_model_len_is_refused(make_engine):
    with pytest.raises(ValueError, match="max_model_len=1024"):
        make_engine(num_blocks=8, max_model_len=1024)


def test_generate_cli_streams_the_greedy_reply(base_model_dir, base_greedy, capsys):
    import argparse

    from nlora_serve.serving.commands.generate import run_generate
    from nlora_serve.serving.commands.generate_flags import add_generate_arguments

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(["--model", str(base_model_dir), "--message", "What is the capital of France?",
                              "--max-tokens", "6", "--dtype", "float32", "--stream"])
    assert run_generate(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(base_greedy[0]["text"][:20])


def test_a_failed_step_tells_every_request_of_its_batch_nothing_of_the_cause(make_engine, monkeypatch, caplog):
    """A step that raises ends every request it ran, each tenant's alike: the exception's text (here
    another tenant's adapter and the store's path, as a kernel's or a pool's check may word it) went
    to each client; now each reads one fixed text and the server's log has the cause."""
    engine = make_engine()
    step, calls = engine.core.step, []
    cause = "adapter 'acme-secret' v3 (/srv/store/acme-secret/v3): rank 64 does not fit the pool"

    def failing():  # the third step (both requests prefilled and decoding) raises
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError(cause)
        return step()

    monkeypatch.setattr(engine.core, "step", failing)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def scenario():
        streams = [engine.add_request(chat(engine, PROMPT), params, request_id=rid, tenant=tenant)
                   for rid, tenant in (("a", "bob"), ("b", "carol"))]
        errors = []
        for stream in streams:
            with pytest.raises(EngineError) as err:
                async for _ in stream:
                    pass
            errors.append(str(err.value))
        return errors

    errors = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert errors == [f"request {rid} failed: the engine failed while running this request (the server's log has "
                      "the cause)" for rid in ("a", "b")]
    assert "engine step failed; ending every running request" in caplog.text and cause in caplog.text


def test_a_device_that_fails_after_a_step_makes_the_engine_dead(make_engine, monkeypatch, caplog):
    """A failed step's requests end and the engine serves on; but when waiting for the device then
    raises (a sticky CUDA error: every later step would fail too), the engine reports itself dead, so
    the server's health turns 503 and it exits 1, its requests aborted without a drain (serve._watch_engine), and new requests
    are refused with 503 rather than each failing. helper-148 found /health at 200 behind such an
    engine. CUDA is faked: only fail_all's wait reads the device here."""
    engine = make_engine()
    assert engine.dead_reason is None

    def sticky(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    cpu, engine.core.device = engine.core.device, torch.device("cuda")
    try:
        engine.core.fail_all("x")  # what the step thread runs after a step raised; no request in flight
    finally:
        engine.core.device = cpu
    assert engine.dead_reason == "the device failed (CUDA error: an illegal memory access was encountered)"
    assert "waiting for the device after a failed step" in caplog.text

    async def submit():
        engine.add_request(chat(engine, PROMPT), SamplingParams(max_tokens=2))

    with pytest.raises(EngineDead):
        asyncio.run(submit())


def test_a_request_that_fails_to_queue_ends_alone_and_the_engine_serves_on(make_engine, monkeypatch):
    # Once, torch's manual_seed overflowing inside core.add killed the step thread for everyone.
    engine = make_engine()
    add, calls = engine.core.add, []

    def flaky(rid, ids, params, *rest):  # the core sees engine ids only: fail the first add
        calls.append(rid)
        if len(calls) == 1:
            raise ValueError("Overflow when unpacking long long")
        return add(rid, ids, params, *rest)

    monkeypatch.setattr(engine.core, "add", flaky)
    params = SamplingParams(max_tokens=3, temperature=0.0)

    async def scenario():
        bad = engine.add_request(chat(engine, PROMPT), params, request_id="bad")
        with pytest.raises(EngineError, match="Overflow"):
            async for _ in bad:
                pass
        return [out async for out in engine.add_request(chat(engine, PROMPT), params, request_id="good")]

    good = asyncio.run(asyncio.wait_for(scenario(), timeout=60))  # a dead step thread would hang
    assert good[-1].finish_reason == "length" and good[-1].completion_tokens == 3


@OVERLAP
def test_an_idle_engine_holds_no_finished_request(overlap, make_engine):
    # A soak's find: the step's block-table rows kept every finished sequence (its prompt and
    # output ids, its prefix-cache hashes) until rows ran short, up to twice the largest step of
    # them for as long as the server idled.
    engine = make_engine(async_scheduling=overlap)
    prompts = [chat(engine, f"Tell me about the number {i}.") for i in range(12)]
    gc.collect()
    before = {id(o) for o in gc.get_objects() if type(o) is Sequence}  # other tests' own
    outs = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [o.finish_reason for o in outs] == ["length"] * 12
    gc.collect()
    assert [o.request_id for o in gc.get_objects() if type(o) is Sequence and id(o) not in before] == []
