"""The structured-output compiler's bounds (engine/structured_output/grammar_compiler.py), on the default model's tokenizer
alone: vLLM 0.32's JSON nesting limit (depths counted by hand), specs that allow no token refused
at compile time, one compile slot per tenant while its slow compile runs on, and a request's
compiled grammar kept with its spec once the cache has dropped it. A slow compile is the real
compile held at a gate the test opens, so that no timing decides the outcome."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from transformers import AutoTokenizer

from nlora_serve.engine.structured_output import grammar_compiler
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.engine.structured_output.grammar_compiler import MAX_COMPILING, CompileBusy, GrammarCompiler
from nlora_serve.engine.structured_output.structured import StructuredOutputs


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture
def compiler(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, timeout_s=30.0)
    yield compiler
    # a compile thread still starting when its test ends (a caller with a 0 s timeout does not wait
    # for it) looked up the next test's patched _compile: test_a_tenant_never_meets_another_tenants_compile
    # counted test_the_cache_holds_its_bytes_bound's regex among its compiles (1 run in ~20)
    deadline = time.monotonic() + 30
    while compiler._jobs and time.monotonic() < deadline:
        time.sleep(0.01)


def nested_schema(containers: int) -> str:
    """A schema, as JSON text, whose objects nest ``containers`` deep, the top one included: arrays
    of arrays of integers, each level one object holding the next under "items"."""
    text = '{"type": "integer"}'
    for _ in range(containers - 1):
        text = '{"type": "array", "items": ' + text + "}"
    return text


def alternating(containers: int) -> str:
    """JSON text ``containers`` deep, lists and objects in turn ({"anyOf": [{"anyOf": [...]}]})."""
    text = '{"type": "integer"}'
    for depth in range(2, containers + 1):
        text = f"[{text}]" if depth % 2 == 0 else '{"anyOf": ' + text + "}"
    return text


def test_json_nested_past_vllms_64_levels_is_refused_before_it_compiles(compiler):
    # vLLM: objects and arrays nest at most 64 levels, the top one included (counted here by construction)
    assert compiler.compile(StructuredOutputs(json=nested_schema(64))) is not None
    assert StructuredOutputs(json=alternating(64)).json  # lists count as objects do
    for text in (nested_schema(65), alternating(65), nested_schema(2000), "[" * 30_000 + "]" * 30_000):
        with pytest.raises(RequestError, match="nested too deeply: objects and arrays may nest at most 64") as caught:
            StructuredOutputs(json=text, param="response_format")
        assert caught.value.param == "response_format"
    with pytest.raises(RequestError, match="structured_outputs.json is not JSON: Expecting value"):
        StructuredOutputs(json="{\"type\": }")  # was xgrammar's "does not compile: . The JSON string is:{..."
    for kind in ("json", "grammar"):  # vLLM's words
        with pytest.raises(RequestError, match=f"structured_outputs.{kind} cannot be an empty string"):
            StructuredOutputs(**{kind: " \n"})


@pytest.mark.parametrize("spec", [StructuredOutputs(regex="[^\\x00-\\U0010FFFF]"),
                                  StructuredOutputs(grammar="root ::= [^\\x00-\\U0010FFFF]", param="response_format")])
def test_a_spec_no_token_can_start_is_refused_at_compile_time(compiler, spec):
    """An empty character class matches nothing: no token, not even EOS, may come first. Its request
    failed in the engine (500, 'token 0 breaks the request's structured output') before."""
    with pytest.raises(RequestError, match=f"{spec.param}: the {spec.kind} matches no text") as caught:
        compiler.compile(spec)
    assert caught.value.param == spec.param
    assert compiler.compile(StructuredOutputs(regex="")) is not None  # the empty output: EOS first, allowed


def gated(monkeypatch, slow: set[str]) -> threading.Event:
    """Hold the compile of every spec whose text is in ``slow`` until the returned event is set
    (then it compiles for real): a compile that runs past its caller's timeout."""
    gate, compile_for_real = threading.Event(), grammar_compiler._compile

    def compile_(compiler, spec):
        if spec.text in slow:
            gate.wait(60)
        return compile_for_real(compiler, spec)

    monkeypatch.setattr(grammar_compiler, "_compile", compile_)
    return gate


def test_a_tenants_slow_specs_hold_one_slot_and_others_compile_meanwhile(compiler, monkeypatch):
    slow = [f"x{i}[a-z]" for i in range(MAX_COMPILING + 1)]
    gate = gated(monkeypatch, set(slow))
    compiler.timeout_s = 0.2
    with pytest.raises(RequestError, match="did not compile within 0.2 s"):
        compiler.compile(StructuredOutputs(regex=slow[0]), tenant="flood")
    for regex in slow[1:]:  # refused at once: its first still compiles (before: each took a slot)
        with pytest.raises(CompileBusy, match="an earlier spec of this tenant is still compiling"):
            compiler.compile(StructuredOutputs(regex=regex), tenant="flood")
    compiler.timeout_s = 30.0
    others = [StructuredOutputs(regex=f"{name}[0-9]") for name in ("bob", "carol")]
    for spec, tenant in zip(others, ("bob", "carol")):  # before: "busy compiling other specs"
        assert compiler.compile(spec, tenant=tenant) is not None
    shared = StructuredOutputs(regex=slow[0])  # the flooder's own spec again: joins its compile that runs
    joined = threading.Thread(target=compiler.compile, args=(shared, "flood"))
    joined.start()
    gate.set()
    joined.join(30)
    assert shared.compiled is not None and compiler.compile(StructuredOutputs(regex=slow[1]), tenant="flood")


def test_a_compiled_spec_survives_its_eviction_from_the_cache(compiler, monkeypatch):
    """The engine looks a request's grammar up again at admission (the event loop) and for its
    matcher (the step thread): once the cache has dropped it, it was compiled again there."""
    monkeypatch.setattr(grammar_compiler, "MAX_CACHED", 2)
    spec = StructuredOutputs(json='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    first = compiler.compile(spec, tenant="bob")
    for i in range(3):  # bob's own newer specs (another tenant's would evict their own first)
        compiler.compile(StructuredOutputs(regex=f"evict{i}"), tenant="bob")
    gate = gated(monkeypatch, {spec.text})  # any compile of it from here runs past its caller's timeout
    compiler.timeout_s = 0.0
    with pytest.raises(RequestError, match="did not compile within 0 s"):  # the cache dropped it
        compiler.compile(StructuredOutputs(json=spec.json))
    assert compiler.compile(spec) is first
    assert compiler.matcher(spec) is not None
    gate.set()


def test_the_cache_holds_its_bytes_bound(compiler, monkeypatch):
    """A 64 KB regex compiles to ~18 MB: 256 of them held ~4.5 GB. The cache keeps the most recent
    grammars whose memory_size_bytes (xgrammar's own count) fit MAX_CACHED_BYTES."""
    specs = [StructuredOutputs(regex="a" * 20_000 + c) for c in "bcd"]
    sizes = [compiler.compile(spec).memory_size_bytes for spec in specs[:1]]
    monkeypatch.setattr(grammar_compiler, "MAX_CACHED_BYTES", int(sizes[0] * 2.5))  # room for two of them
    sizes += [compiler.compile(spec).memory_size_bytes for spec in specs[1:]]
    assert compiler.cached_bytes == sizes[1] + sizes[2] <= grammar_compiler.MAX_CACHED_BYTES
    gate = gated(monkeypatch, {spec.text for spec in specs})  # a compile from here runs past its timeout
    compiler.timeout_s = 0.0
    for spec in specs[1:]:
        assert compiler.compile(StructuredOutputs(regex=spec.regex)) is not None  # still cached
    with pytest.raises(RequestError, match="did not compile within 0 s"):  # the oldest was dropped
        compiler.compile(StructuredOutputs(regex=specs[0].regex))
    gate.set()


def test_a_tenant_never_meets_another_tenants_compile(compiler, monkeypatch):
    """The cache was shared: a tenant sending a spec another had sent got its grammar in microseconds
    where its own new spec compiled (an 80-property schema over HTTP: 24 ms against 55 ms, apart on
    every try), so it could test guesses of another tenant's schema. Now each tenant compiles its own,
    cached or in flight, as the prefix cache is salted per tenant."""
    gate = gated(monkeypatch, {"in-flight[0-9]"})
    compiled, compile_gated = [], grammar_compiler._compile
    monkeypatch.setattr(grammar_compiler, "_compile",
                        lambda c, spec: compiled.append(spec.text) or compile_gated(c, spec))
    secret = '{"type": "object", "properties": {"diagnosis": {"type": "string"}}}'
    compiler.compile(StructuredOutputs(json=secret), tenant="bob")
    compiler.compile(StructuredOutputs(json=secret), tenant="bob")  # bob's own repeat: a lookup
    assert compiled == [secret]
    compiler.compile(StructuredOutputs(json=secret), tenant="eve")  # before: bob's grammar, no compile
    assert compiled == [secret, secret]
    bobs = threading.Thread(target=compiler.compile, args=(StructuredOutputs(regex="in-flight[0-9]"), "bob"))
    bobs.start()
    eves = threading.Thread(target=compiler.compile, args=(StructuredOutputs(regex="in-flight[0-9]"), "eve"))
    eves.start()  # before: eve waited on bob's compile and ended with it
    deadline = time.monotonic() + 10
    while compiled.count("in-flight[0-9]") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    bobs.join(30), eves.join(30)
    assert compiled.count("in-flight[0-9]") == 2


def test_a_tenants_stream_of_new_specs_evicts_its_own_grammars_first(compiler, monkeypatch):
    """Plain LRU: a tenant sending new specs pushed every other tenant's grammar out (28 regexes of
    64 KB fill the 512 MiB), and each of their requests compiled again, up to 5 s. Now, past a bound,
    the tenant holding the most loses its least recent; the others keep theirs."""
    monkeypatch.setattr(grammar_compiler, "MAX_CACHED", 4)
    compiled, compile_for_real = [], grammar_compiler._compile
    monkeypatch.setattr(grammar_compiler, "_compile",
                        lambda c, spec: compiled.append(spec.text) or compile_for_real(c, spec))
    kept = {"bob": StructuredOutputs(regex="bob[0-9]"), "carol": StructuredOutputs(regex="carol[0-9]")}
    for tenant, spec in kept.items():
        compiler.compile(spec, tenant)
    for i in range(6):
        compiler.compile(StructuredOutputs(regex=f"flood{i}"), tenant="flood")
    for tenant, spec in kept.items():  # before: both dropped, compiled again here
        compiler.compile(StructuredOutputs(regex=spec.regex), tenant)
    assert [text for text in compiled if not text.startswith("flood")] == ["bob[0-9]", "carol[0-9]"]
    compiler.compile(StructuredOutputs(regex="flood5"), tenant="flood")  # its newest two stayed
    compiler.compile(StructuredOutputs(regex="flood4"), tenant="flood")
    assert len(compiled) == 8
    # the bytes bound: the same rule
    monkeypatch.setattr(grammar_compiler, "MAX_CACHED_BYTES", compiler.cached_bytes - 1)
    compiler.compile(StructuredOutputs(regex="bob[a-z]"), tenant="bob")
    assert compiler.cached_bytes <= grammar_compiler.MAX_CACHED_BYTES
    compiler.compile(StructuredOutputs(regex="carol[0-9]"), tenant="carol")
    assert len(compiled) == 9


def niceness(tid: int) -> int:
    return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_a_compile_runs_at_its_callers_priority_for_its_cpu_grace_then_niced_with_its_workers(compiler, monkeypatch):
    """A spec that compiles for minutes in the background took, with xgrammar's 2 workers, the CPU
    of the engine's step thread: another tenant's 150-token stream took 184 s instead of 28 s on 2
    cores; niced from its start, a regex of 0.19 CPU-s took 7 to 27 s beside 2 busy cores, past the
    5 s timeout, and was refused. A compile now runs at its caller's nice value until its threads
    have used COMPILE_GRACE_CPU_S, however long it waits for a CPU, then it and the workers it
    started (xgrammar starts them at once) run niced."""
    monkeypatch.setattr(grammar_compiler, "COMPILE_GRACE_CPU_S", 0.05)
    seen, compile_for_real = {}, grammar_compiler._compile

    def compile_(compiler, spec):
        me, finish = threading.get_native_id(), threading.Event()

        def work():  # a worker that computes until it is niced
            worker = threading.get_native_id()
            seen["worker at start"] = niceness(worker)
            deadline = time.monotonic() + 10
            while niceness(worker) != expected and time.monotonic() < deadline:
                sum(range(1000))
            seen["worker niced"] = niceness(worker)
            finish.set()

        seen["compile at start"] = niceness(me)
        time.sleep(0.3)  # no CPU used: a compile on a saturated box waits as long for a core
        seen["compile after a wait"] = niceness(me)
        threading.Thread(target=work).start()
        finish.wait(10)
        seen["compile niced"] = niceness(me)
        return compile_for_real(compiler, spec)

    caller = niceness(threading.get_native_id())
    if caller >= 19:
        pytest.skip("the tests already run at the largest nice value")
    expected = min(19, caller + grammar_compiler.COMPILE_NICENESS)
    assert compiler.compile(StructuredOutputs(regex="[0-9]{3}"), tenant="bob") is not None
    monkeypatch.setattr(grammar_compiler, "_compile", compile_)
    assert compiler.compile(StructuredOutputs(regex="[0-9]{4}"), tenant="bob") is not None
    # before: niced from the first instruction (caller + 19 at start)
    assert seen == {"compile at start": caller, "compile after a wait": caller, "worker at start": caller,
                    "compile niced": expected, "worker niced": expected}
    assert niceness(threading.get_native_id()) == caller
    seen.clear()  # a compile whose thread starts past its caller's timeout (here 0) nices itself
    compiler.timeout_s = 0.0
    with pytest.raises(RequestError, match="did not compile within 0 s"):
        compiler.compile(StructuredOutputs(regex="[0-9]{5}"), tenant="carol")
    assert wait_until(lambda: "compile niced" in seen) and seen["compile niced"] == expected


def test_compiles_past_their_timeout_give_their_slot_to_other_tenants(compiler, monkeypatch):
    """Two tenants' slow specs (a 50 KB schema compiles for minutes) held both compile slots: every
    other tenant's new spec was refused, 'busy compiling other specs', until they ended. A compile
    past its caller's timeout now runs on as one of MAX_OVERDUE; past those it keeps its slot."""
    floods = [f"flood{i}" for i in range(grammar_compiler.MAX_OVERDUE + MAX_COMPILING)]
    slow = {tenant: f"{tenant}[a-z]" for tenant in floods}
    gate = gated(monkeypatch, set(slow.values()))
    compiler.timeout_s = 0.2
    for i, tenant in enumerate(floods):
        if i == grammar_compiler.MAX_OVERDUE:
            assert compiler.compile(StructuredOutputs(regex="bob[0-9]"), tenant="bob") is not None  # before: busy
        with pytest.raises(RequestError, match="did not compile within 0.2 s"):
            compiler.compile(StructuredOutputs(regex=slow[tenant]), tenant=tenant)
    with pytest.raises(CompileBusy, match="busy compiling other specs"):  # every slot of either kind taken
        compiler.compile(StructuredOutputs(regex="carol[0-9]"), tenant="carol")
    gate.set()
    compiler.timeout_s = 30.0
    for tenant in floods:  # each compile ended and gave back its slot; its grammar is cached
        assert compiler.compile(StructuredOutputs(regex=slow[tenant]), tenant=tenant) is not None
    specs = [StructuredOutputs(regex=f"after{i}[0-9]")
             for i in range(grammar_compiler.MAX_OVERDUE + MAX_COMPILING)]
    for i, spec in enumerate(specs):
        assert compiler.compile(spec, tenant=f"t{i}") is not None
