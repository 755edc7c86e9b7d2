"""vLLM's grammar cache is not shared across tenants (grammar_salt.py, engine_args.py): a JSON schema,
``json_object``, a regex, a grammar or a choice sent by two tenants is two keys for vLLM (its own
get_structured_output_key), two entries in an xgrammar compiler with a cache (it grew on the second
tenant's compile, not on the first tenant's repeat), and compiles to the grammar xgrammar makes of the
spec as sent (the printed grammars are equal); vLLM's own xgrammar backend, built under the environment
engine_args leaves, has a cache limit of 0 MB (the last grammar only). Runs only where vllm is
importable (see conftest.py).
"""

from __future__ import annotations

import json

import pytest

from nlora_serve.engine.structured_output.structured import StructuredOutputs

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                     "age": {"type": "integer", "minimum": 0}},
                     "required": ["name", "age"]})
SPECS = {"json": StructuredOutputs(json=SCHEMA), "json_object": StructuredOutputs(json_object=True),
         "json_compact": StructuredOutputs(json=SCHEMA, disable_any_whitespace=True),
         "regex": StructuredOutputs(regex=r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"),
         "regex_alternation": StructuredOutputs(regex=r"ab+|c(d|e)*"),
         "regex_anchors": StructuredOutputs(regex="^a|b$"),
         "grammar": StructuredOutputs(grammar='root ::= "yes" | "no" [0-9]*'),
         "choice": StructuredOutputs(choice=["north", "so\"uth\nwest"])}


@pytest.fixture(scope="module")
def compiler(base_fp32):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(base_fp32.tokenizer(), vocab_size=base_fp32.spec.vocab_size)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True, cache_limit_bytes=64 << 20)


def _compile(compiler, params):
    """Compile as vLLM's XgrammarBackend.compile_grammar does, from vLLM's own key of ``params``."""
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions
    from vllm.v1.structured_output.request import get_structured_output_key

    kind, text = get_structured_output_key(params)
    if kind is StructuredOutputOptions.REGEX:
        return compiler.compile_regex(text)
    if kind is StructuredOutputOptions.CHOICE:  # vLLM's input processor turns a choice into a grammar
        from vllm.v1.structured_output.utils import choice_as_grammar

        kind, text = StructuredOutputOptions.GRAMMAR, choice_as_grammar(json.loads(text))
    if kind is StructuredOutputOptions.GRAMMAR:
        return compiler.compile_grammar(text)
    schema = '{"type": "object"}' if kind is StructuredOutputOptions.JSON_OBJECT else text
    assert kind in (StructuredOutputOptions.JSON, StructuredOutputOptions.JSON_OBJECT), kind
    compact = params.disable_any_whitespace
    return compiler.compile_json_schema(schema, any_whitespace=not compact, separators=(",", ":") if compact else None)


@pytest.mark.parametrize("name", list(SPECS))
def test_two_tenants_get_two_cache_entries_of_the_same_grammar(compiler, name):
    from vllm.v1.structured_output.request import get_structured_output_key

    from nlora_serve.engine.vllm_backend.config import vllm_structured

    spec = SPECS[name]
    plain, first, second = (vllm_structured(spec, tenant) for tenant in (None, "tied-co", "lora-co"))
    keys = [get_structured_output_key(p) for p in (plain, first, second)]
    assert len(set(keys)) == 3, keys  # before: one key, whoever sent it
    assert get_structured_output_key(vllm_structured(spec, "tied-co")) == keys[1]  # a tenant's own repeat
    want = str(_compile(compiler, plain).grammar)
    size = compiler.get_cache_size_bytes()
    assert str(_compile(compiler, first).grammar) == want
    grown = compiler.get_cache_size_bytes()
    assert str(_compile(compiler, first).grammar) == want and compiler.get_cache_size_bytes() == grown  # a hit
    assert str(_compile(compiler, second).grammar) == want
    assert size < grown < compiler.get_cache_size_bytes()  # the second tenant compiled its own


def test_vllm_keeps_only_the_last_grammar_unless_the_operator_sets_its_cache(base_fp32, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    from nlora_serve.engine.config import EngineConfig
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine_args import engine_args

    def limit() -> int:
        config = SimpleNamespace(structured_outputs_config=SimpleNamespace(disable_any_whitespace=False),
                                 model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="llama")),
                                 speculative_config=None)
        backend = XgrammarBackend(config, tokenizer=base_fp32.tokenizer(), vocab_size=base_fp32.spec.vocab_size)
        return backend.compiler.cache_limit_bytes

    for name in ("VLLM_XGRAMMAR_CACHE_MB", "VLLM_CPU_KVCACHE_SPACE"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    assert limit() == 512 << 20  # vLLM's default: every grammar kept, whoever sent it
    engine_args(EngineConfig(dtype=torch.float32), VllmBackendConfig(), tmp_path, tmp_path, on_cpu=True)
    assert limit() == 0  # before: 512 MB
    monkeypatch.setenv("VLLM_XGRAMMAR_CACHE_MB", "64")  # the operator's own choice stays
    engine_args(EngineConfig(dtype=torch.float32), VllmBackendConfig(), tmp_path, tmp_path, on_cpu=False)
    assert limit() == 64 << 20
