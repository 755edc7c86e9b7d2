"""adapter_config.json parsing: PEFT parity (against the real peft library), refusals, names."""

from __future__ import annotations

import copy
import math
import re
import string
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlora_serve.adapters.config import REFUSED_FIELDS, lora_scaling, parse_config, plan_sites
from nlora_serve.adapters.names import validate_name
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import PROJECTIONS, ModelSpec

LAYERS = 3
SPEC = ModelSpec(architecture="LlamaForCausalLM", num_layers=LAYERS, hidden_size=16, intermediate_size=24,
                 num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32, attention_bias=False,
                 tie_word_embeddings=False)
NAMES = [ModelSpec.module_path(i, m) for i in range(LAYERS) for m in PROJECTIONS]
# Name pieces PEFT users write: suffixes, block-qualified suffixes, full names.
TARGET_ITEMS = list(PROJECTIONS) + ["self_attn.q_proj", "mlp.up_proj", "layers.1.self_attn.k_proj"] + NAMES[::5]
REGEXES = [r".*\.(q_proj|v_proj)$", r".*\.layers\.[02]\..*_proj", r"model\.layers\.1\.mlp\.(up|down)_proj",
           r".*(k|o)_proj", r".*self_attn\.\w_proj"]
PATTERN_KEYS = ["q_proj", "mlp.up_proj", r"layers\.1\..*", "layers.0.self_attn.v_proj", r".*down_proj", "^model.*"]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=8))


def _peft_sites(model, raw: dict) -> dict[str, tuple[int, float]] | None:
    """{module name: (r, scaling)} where real PEFT puts a LoRA; None when PEFT finds no target."""
    from peft import LoraConfig, get_peft_model

    kwargs = {k: v for k, v in raw.items() if k not in ("peft_type",)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs))
    except ValueError as exc:
        assert "not found in the base model" in str(exc) or "No modules were targeted" in str(exc), exc
        return None
    return {n: (m.r["default"], m.scaling["default"]) for n, m in pm.base_model.model.named_modules()
            if hasattr(m, "scaling") and "default" in getattr(m, "r", {})}


@st.composite
def peft_configs(draw) -> dict:
    raw = {"peft_type": "LORA", "r": draw(st.integers(1, 8)),
           "lora_alpha": draw(st.sampled_from([1, 8, 16, 0.5, -4])), "use_rslora": draw(st.booleans())}
    kind = draw(st.sampled_from(["list", "regex", "all-linear"]))
    if kind == "list":
        raw["target_modules"] = draw(st.lists(st.sampled_from(TARGET_ITEMS), min_size=1, max_size=4, unique=True))
        raw["layers_to_transform"] = draw(st.none() | st.integers(0, LAYERS)
                                          | st.lists(st.integers(0, LAYERS), max_size=3, unique=True))
        if raw["layers_to_transform"] is not None and draw(st.booleans()):
            raw["layers_pattern"] = "layers"
    else:
        raw["target_modules"] = draw(st.sampled_from(REGEXES)) if kind == "regex" else "all-linear"
    raw["exclude_modules"] = draw(st.none() | st.sampled_from(REGEXES)
                                  | st.lists(st.sampled_from(TARGET_ITEMS), max_size=2, unique=True))
    raw["rank_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 8), max_size=2))
    raw["alpha_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.sampled_from([2, 3.5]),
                                                max_size=2))
    return raw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=peft_configs())
def test_sites_ranks_and_scalings_match_real_peft(tiny_llama, raw):
    plans = plan_sites(parse_config(raw), SPEC)
    ours = {ModelSpec.module_path(*k): (p.rank, p.scaling) for k, p in plans.items()}
    peft = _peft_sites(tiny_llama, raw)
    assert ours == (peft or {})
    if isinstance(raw["target_modules"], str) and raw["target_modules"] != "all-linear" and not raw["exclude_modules"]:
        assert set(ours) == {n for n in NAMES if re.fullmatch(raw["target_modules"], n)}  # brute force


@given(r=st.integers(1, 4096), alpha=st.floats(-1e6, 1e6, allow_nan=False), rs=st.booleans())
def test_scaling_rule(r, alpha, rs):
    assert lora_scaling(r, alpha, rs) == (alpha / math.sqrt(r) if rs else alpha / r)


@pytest.mark.parametrize("field,value", [(f, v) for f, v in [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]), ("layer_replication", [[0, 2]]),
    ("alora_invocation_tokens", [5]), ("use_qalora", True), ("use_bdlora", {"nblocks": 2})]])
def test_unservable_fields_are_refused_by_name(field, value):
    assert field in REFUSED_FIELDS
    with pytest.raises(AdapterError, match=re.escape(field)):
        parse_config({"peft_type": "LORA", field: value})


@pytest.mark.parametrize("raw,words", [
    ({"peft_type": "IA3"}, "'IA3'"), ({}, "peft_type None"), ({"peft_type": "LORA", "r": 0}, "r = 0"),
    ({"peft_type": "LORA", "r": "4"}, "r = '4'"), ({"peft_type": "LORA", "r": True}, "r = True"),
    ({"peft_type": "LORA", "rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj'] = -1"),
    ({"peft_type": "LORA", "lora_alpha": float("nan")}, "lora_alpha = nan"),
    ({"peft_type": "LORA", "target_modules": "q_proj("}, "not a valid regex"),
    ({"peft_type": "LORA", "target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"peft_type": "LORA", "layers_pattern": "layers"}, "needs layers_to_transform"),
    ({"peft_type": "LORA", "layers_to_transform": [-1]}, "-1"),
    ({"peft_type": "LORA", "target_modules": 5}, "target_modules = 5"),
    ({"peft_type": "LORA", "nlora_serve": {"format": "zip", "family": "x", "base_fingerprint": "y"}},
     "'zip' is not supported; expected 'tied-n' (a tied IntTune tenant) or 'family-n' (a family member)"),
])
def test_malformed_configs_are_refused_naming_field_and_value(raw, words):
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_config(raw)


@pytest.mark.parametrize("field", ["use_rslora", "lora_bias"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, "no", []])
def test_a_true_false_field_takes_only_a_json_boolean(field, value):
    """bool() read the string "false" as true: a hand-edited use_rslora scaled by alpha / sqrt(r)."""
    with pytest.raises(AdapterError) as err:
        parse_config({"peft_type": "LORA", field: value})
    assert str(err.value) == f"adapter_config.json: {field} = {value!r}; expected true or false (a JSON boolean)"


@pytest.mark.parametrize("value, scaling", [(False, 16 / 4), (None, 16 / 4), (True, 16 / math.sqrt(4))])
def test_use_rslora_false_null_or_true_scales_as_peft_defines(value, scaling):
    cfg = parse_config({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": value})
    assert {p.scaling for p in plan_sites(cfg, SPEC).values()} == {scaling}


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens"], ".*"])
def test_embedding_and_lm_head_targets_are_refused(targets):
    with pytest.raises(AdapterError, match="embeddings or lm_head"):
        plan_sites(parse_config({"peft_type": "LORA", "target_modules": targets}), SPEC)


def test_fan_in_fan_out_is_ignored_with_a_warning_as_peft_does():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        cfg = parse_config({"peft_type": "LORA", "fan_in_fan_out": True})
    assert set(plan_sites(cfg, SPEC)) == {(i, m) for i in range(LAYERS) for m in ("q_proj", "v_proj")}


NAME_CHARS = string.ascii_letters + string.digits + "._-"


@given(st.text(alphabet=NAME_CHARS + "/\\ \n:é\x00", max_size=140))
def test_name_validation_matches_brute_force(name):
    ok = (1 <= len(name) <= 128 and name[0].isascii() and name[0].isalnum()
          and all(c in NAME_CHARS for c in name))
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(AdapterError, match="not valid"):
            validate_name(name)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "/abs", "", "a" * 129, "a\n", "-x", "a/../b"])
def test_names_that_could_leave_the_store_are_refused(name):
    with pytest.raises(AdapterError):
        validate_name(name)


def test_catastrophic_target_regex_cannot_stall_the_server():
    import time

    from nlora_serve.adapters.config import _user_match

    spec = ModelSpec("LlamaForCausalLM", 30, 576, 1536, 9, 3, 64, 49152, False, True)
    # Python's re backtracks for minutes on this against a module name (with the GIL held).
    cfg = parse_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "(.*)*X"})
    start = time.perf_counter()
    assert plan_sites(cfg, spec) == {}
    assert time.perf_counter() - start < 2
    # A pattern that is slow even for the regex engine hits the per-match timeout instead.
    with pytest.raises(AdapterError, match=r"target_modules '\(a\|aa\)\+b' took over 50 ms .*catastrophic"):
        _user_match("target_modules", "(a|aa)+b", "a" * 60, full=True)


@pytest.mark.parametrize("field_name", ["alpha_pattern", "rank_pattern", "nlora_serve"])
def test_pattern_fields_of_the_wrong_type_are_named(field_name):
    from nlora_serve.adapters.config import parse_config

    with pytest.raises(AdapterError, match=f"{field_name} must be a JSON object, got str"):
        parse_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, field_name: "x"})


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"])
def test_a_pattern_field_over_the_entry_limit_is_refused_before_any_match(field):
    """Each entry is matched against every module name: 20,000 rank_pattern keys (a 250 KB config)
    took 104 s of an upload's thread on this model, 200,000 target_modules names 9 s."""
    from nlora_serve.adapters.config import MAX_PATTERN_ENTRIES

    names = [f"m{i}" for i in range(MAX_PATTERN_ENTRIES + 1)]
    value = dict.fromkeys(names, 4) if field.endswith("pattern") else names
    with pytest.raises(AdapterError, match=rf"^adapter_config.json: {field} has {MAX_PATTERN_ENTRIES + 1} entries, "
                                           rf"over the limit of {MAX_PATTERN_ENTRIES}"):
        parse_config({"peft_type": "LORA", "target_modules": ["q_proj"], field: value})
    if not field.endswith("pattern"):  # (8192 pattern keys take 1 s to compile: the limit itself passes for lists)
        parse_config({"peft_type": "LORA", "target_modules": ["q_proj"], field: names[:MAX_PATTERN_ENTRIES]})


@pytest.mark.parametrize("init", ["olora", "OLoRA", "pissa", "pissa_niter_2", "corda", "loftq"])
def test_an_init_that_rewrites_the_base_weight_is_refused(tiny_llama, init):
    """PEFT's PiSSA / OLoRA / CorDA / LoftQ inits rewrite the base weight, and PEFT's loader runs them
    again on the base an adapter is loaded onto: such an adapter was served here on the unmodified base,
    a different model from the one PEFT loads, silently."""
    if init in ("olora", "pissa"):  # PEFT itself, loading such a config, changes the base weight
        from peft import LoraConfig, get_peft_model

        model = copy.deepcopy(tiny_llama)
        before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=init))
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    with pytest.raises(AdapterError, match=rf"^adapter_config.json: init_lora_weights = '{init}' is not "
                                           "supported: .* rewrites the base weight .* convert it to a plain LoRA"):
        parse_config({"peft_type": "LORA", "init_lora_weights": init})
    for kept in (True, False, "gaussian", "eva", "orthogonal", "n_lora", "s_lora"):  # no base rewrite
        assert parse_config({"peft_type": "LORA", "init_lora_weights": kept}).init_lora_weights == kept
