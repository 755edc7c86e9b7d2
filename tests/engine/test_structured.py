"""Structured outputs in the engine (engine/structured_output/structured.py), against references that do not use xgrammar:
every sampled answer checked by json.loads and a hand check of the schema, re.fullmatch, membership;
greedy constrained tokens against a brute-force masked greedy on transformers' model (at each step
the argmax over the tokens whose text keeps the output a prefix of a match, ``regex``'s partial
matching); unconstrained rows unchanged by a constrained row in their batch."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import regex
import torch

from greedy_rule import matches_reference
from nlora_serve.engine.api import EngineError
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.structured_output.structured import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                            "admin": {"type": "boolean"}},
          "required": ["name", "age", "admin"]}
EMAIL = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
CITIES = ("Paris", "London", "Berlin", "Madrid")
GRAMMAR = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no"'  # EBNF (xgrammar's dialect)


def chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)


def check_person(text: str) -> None:
    """SCHEMA by hand (jsonschema is not installed): the keys, their types and bounds."""
    value = json.loads(text)
    assert set(value) == {"name", "age", "admin"}, text  # strict: no additional properties (vLLM's default)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert type(value["admin"]) is bool


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_sampled_answers_follow_their_spec_for_every_seed(make_engine, async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    specs = [(StructuredOutputs(json=json.dumps(SCHEMA)), check_person),
             (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
             (StructuredOutputs(regex=EMAIL), lambda t: re.fullmatch(EMAIL, t) is not None),
             (StructuredOutputs(choice=CITIES), lambda t: t in CITIES),
             (StructuredOutputs(grammar=GRAMMAR), lambda t: re.fullmatch(r"The answer is (yes|no)\.", t) is not None)]
    prompt = chat(engine, "Describe a person in JSON, or give an email address, or a city.")
    params = [SamplingParams(max_tokens=160, temperature=1.0, seed=seed, structured_outputs=spec)
              for spec, _ in specs for seed in range(3)]
    outs = engine.generate([prompt] * len(params), params)
    for i, out in enumerate(outs):
        spec, check = specs[i // 3]
        if spec.json_object and out.finish_reason == "length":  # free JSON can run on; its prefix is still JSON-like
            assert out.text.lstrip().startswith("{")
            continue
        assert out.finish_reason == "stop", (spec.kind, out.text)
        assert check(out.text) is not False, (spec.kind, out.text)
        assert out.token_ids[-1] in engine.core.eos_ids  # the matcher ended on a stop token, left out of the text


def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (its bytes_to_unicode): printable bytes are themselves,
    the others are mapped to code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class MaskedGreedy:
    """Brute-force masked greedy on transformers' model: each step's argmax among the tokens whose
    text keeps the output a prefix of a full match of ``pattern`` (EOS only after a full match)."""

    def __init__(self, hf_model, tokenizer, eos: set[int]):
        self.model, self.eos = hf_model, eos
        decoder = byte_of_char()
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.texts = {}
        for tid, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if tid in special:
                continue
            try:
                self.texts[tid] = bytes(decoder[c] for c in piece).decode("utf-8")
            except (KeyError, UnicodeDecodeError):  # part of a character: no ASCII pattern's prefix
                continue

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], pattern: str, max_tokens: int) -> tuple[list[int], list[float]]:
        ids, text, margins = list(prompt_ids), "", []
        for _ in range(max_tokens):
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
            allowed = [t for t, piece in self.texts.items()
                       if regex.fullmatch(pattern, text + piece, partial=True) is not None]
            if regex.fullmatch(pattern, text) is not None:
                allowed += sorted(self.eos)
            values = logits[torch.tensor(allowed)]
            top = values.topk(min(2, len(allowed)))
            margins.append(float(top.values[0] - top.values[1]) if len(allowed) > 1 else float("inf"))
            token = allowed[int(top.indices[0])]
            ids.append(token)
            if token in self.eos:
                break
            text += self.texts[token]
        return ids[len(prompt_ids):], margins


@pytest.mark.parametrize("pattern, question", [
    ("|".join(CITIES), "What is the capital of Germany? Answer with one word."),
    (EMAIL, "Write an email address for Bob at example."),
    (r"(yes|no), because [a-z ]{4,30}\.", "Is the sky green? Answer yes or no and why."),
], ids=["choice", "email", "sentence"])
def test_greedy_constrained_tokens_equal_a_brute_force_masked_greedy(make_engine, hf_model, pattern, question):
    engine = make_engine()
    prompt = engine.tokenizer(chat(engine, question))["input_ids"]
    spec = StructuredOutputs(choice=CITIES) if pattern == "|".join(CITIES) else StructuredOutputs(regex=pattern)
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, structured_outputs=spec))[0]
    want, margins = MaskedGreedy(hf_model, engine.tokenizer, engine.core.eos_ids).run(prompt, pattern, 24)
    assert matches_reference(out.token_ids, want, margins), (out.text, engine.tokenizer.decode(want))
    assert regex.fullmatch(pattern, out.text) and out.finish_reason == "stop"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_unconstrained_rows_are_unchanged_by_a_constrained_row_in_their_batch(make_engine, async_scheduling):
    """Two same-shaped batches: the third row constrained in one, free in the other (same prompt)."""
    engine = make_engine(async_scheduling=async_scheduling)
    prompts = [chat(engine, q) for q in ("Tell me a story.", "List three fruits.", "Give me a person as JSON.")]
    free = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True)]
    constrained = SamplingParams(max_tokens=20, temperature=1.0, seed=5, structured_outputs=StructuredOutputs(
        json=json.dumps(SCHEMA)))
    with_grammar = engine.generate(prompts, free + [constrained])
    without = engine.generate(prompts, free + [SamplingParams(max_tokens=20, temperature=1.0, seed=5)])
    assert [o.token_ids for o in with_grammar[:2]] == [o.token_ids for o in without[:2]]
    assert with_grammar[2].text.startswith("{") and with_grammar[2].token_ids != without[2].token_ids


def test_logprobs_of_a_constrained_row_are_the_masked_distribution(make_engine):
    """vLLM applies the bitmask before its sampler, so a constrained row's logprobs renormalise over
    the allowed tokens: the choice's first tokens hold all the probability."""
    engine = make_engine()
    spec = StructuredOutputs(choice=("yes", "no"))
    out = engine.generate([chat(engine, "Is water wet?")], SamplingParams(max_tokens=4, temperature=0.0, logprobs=5,
                                                                      structured_outputs=spec))[0]
    first = out.logprobs[0]
    allowed = {t: lp for t, lp in first.items() if lp > float("-inf")}
    texts = {engine.tokenizer.decode([t]) for t in allowed}
    assert texts <= {"yes", "no", "y", "n", "ye"} and out.text in ("yes", "no")
    assert sum(torch.tensor(list(allowed.values())).exp()) == pytest.approx(1.0, abs=1e-4)


def test_bad_specs_are_refused_before_they_queue(make_engine):
    engine = make_engine()
    bad = [StructuredOutputs(json='{"type": "strnig"}', param="response_format"),
           StructuredOutputs(regex="[a-"), StructuredOutputs(grammar="root ::= ")]
    try:
        json.loads("{not json")
    except ValueError as exc:  # text that is no JSON: refused before any compile, in the parser's words
        with pytest.raises(RequestError, match=re.escape(f"structured_outputs.json is not JSON: {exc}")):
            StructuredOutputs(json="{not json")
    for spec in bad:
        with pytest.raises(RequestError, match=f"{spec.param}: the {spec.kind} does not compile") as caught:
            engine.generate(["hi"], SamplingParams(structured_outputs=spec))
        assert caught.value.param == spec.param
    assert engine.core.requests == {}
    engine.core.grammars.timeout_s = 0.3  # .{0,1500} takes seconds (its compile goes on in the background)
    started = time.monotonic()
    with pytest.raises(RequestError, match=r"structured_outputs: the regex did not compile within 0.3 s"):
        engine.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputs(regex=".{0,1500}")))
    assert time.monotonic() - started < 2.0 and engine.core.requests == {}
    with pytest.raises(RequestError, match="exactly one of"):
        StructuredOutputs(json="{}", regex="a")
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputs(regex="a+"))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preempted_constrained_requests_resume_their_grammar(make_engine, async_scheduling):
    """A preempted request keeps its matcher and its tokens, recomputes and goes on: under a tiny KV
    cache (preemptions) its greedy tokens equal those of a roomy engine, and stay a full match."""
    pattern = r"(yes|no), because [a-z ]{10,40}\."
    roomy = make_engine(async_scheduling=async_scheduling)
    prompts = [chat(roomy, q) for q in ("Is the sky green?", "Is fire cold?", "Is ice hot?", "Is grass blue?")]
    params = SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=StructuredOutputs(regex=pattern))
    want = roomy.generate(prompts, params)
    # 12 blocks of 8 tokens for four 35-token prompts (5 blocks each) growing by up to 30: they cannot all stay
    tiny = make_engine(block_size=8, num_blocks=12, max_model_len=80, async_scheduling=async_scheduling)
    got = tiny.generate(prompts, params)
    assert tiny.stats()["preemptions"] >= 1 and tiny.stats()["kv_blocks_used"] == 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(regex.fullmatch(pattern, o.text) and o.finish_reason == "stop" for o in got), [o.text for o in got]


def test_a_dead_end_in_a_spec_ends_its_request_saying_so_and_spares_the_batch(make_engine):
    """After "ab" the regex wants a character of an empty class: nothing may follow, not even EOS.
    vLLM ends such a request as an error; its message said "token 0 breaks the request's structured
    output" (the argmax of an all -inf row), as if the engine were at fault."""
    engine = make_engine()
    dead = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputs(regex="ab[^\\x00-\\U0010FFFF]"))
    free = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = chat(engine, "Say ab.")
    want = engine.generate([prompt], free)[0]


    async def both() -> tuple[str, list[int]]:  # queued together: they share their steps
        streams = [engine.add_request(prompt, params) for params in (dead, free)]
        with pytest.raises(EngineError) as failed:
            [out async for out in streams[0]]
        return str(failed.value), [t async for out in streams[1] for t in out.token_ids]

    error, free_tokens = asyncio.run(both())
    assert "the structured output allows no token after" in error and "its spec has a dead end here" in error, error
    assert free_tokens == want.token_ids  # the other row of the batch is unchanged
    assert engine.core.requests == {} and engine.stats()["kv_blocks_used"] == 0

    # allowed_token_ids of digits under a letters-only regex: a row of -inf too, and the same words
    # blamed the engine; they now name the request's masks (the same engine: no second start)
    digits = tuple(engine.tokenizer.convert_tokens_to_ids(list("0123456789")))
    assert all(engine.tokenizer.decode([t]).isdigit() for t in digits)
    masked = SamplingParams(max_tokens=4, temperature=0.0, allowed_token_ids=digits,
                            structured_outputs=StructuredOutputs(regex="[a-z]+"))

    async def contradicted() -> str:
        with pytest.raises(EngineError) as failed:
            [out async for out in engine.add_request(prompt, masked)]
        return str(failed.value)

    error = asyncio.run(contradicted())
    assert "allowed_token_ids / bad_words ban every token the structured output allows after 0 tokens" in error, error
    assert engine.core.requests == {} and engine.stats()["kv_blocks_used"] == 0


def test_a_row_without_a_matcher_keeps_every_token():
    """mask_rows' None matcher (the dummy sampler run's, engine/runner/dummy_sampler.py) leaves its row
    as it was; a matcher's row beside it is still masked (hand-built: a choice of one token)."""
    import xgrammar as xgr

    from nlora_serve.engine.structured_output.structured import mask_rows

    vocab = ["a", "b", "c", "</s>"]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[3])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex("b"))
    logits = torch.arange(8, dtype=torch.float32).view(2, 4)
    mask_rows(logits, [0, 1], [None, matcher])
    inf = float("-inf")
    assert logits.tolist() == [[0.0, 1.0, 2.0, 3.0], [inf, 5.0, inf, inf]]
