"""Every shared case through ``adapters inspect``: rejects with the right words, accepts with the
recorded greedy tokens on merged weights (README rule), checked against an independent merge."""

from __future__ import annotations

import os

import pytest
from adapter_helpers import (CASES, case_names, file_deltas, first_near_tie, forced_greedy, greedy,
                             greedy_matches, load_case, max_rel_err, merged)

from nlora_serve.adapters.inspect import inspect_adapter
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import ModelSpec

REJECT = [n for n in case_names() if load_case(n)["expect"] == "reject"]
ACCEPT = [n for n in case_names() if load_case(n)["expect"] == "accept"]


def test_the_shared_cases_are_all_here():
    assert len(REJECT) >= 9 and len(ACCEPT) >= 8


@pytest.mark.parametrize("name", REJECT)
def test_reject_case_names_the_problem(name, base_fp32):
    case = load_case(name)
    path = CASES / name
    with pytest.raises(AdapterError) as info:
        inspect_adapter(path, base_fp32, max_rank=case.get("server_max_rank", 64))
    message = str(info.value).replace(str(path), "<adapter>").lower()
    assert any(word.lower() in message for word in case["error_mentions_any"]), message
    if "must_not_exist" in case:
        assert not os.path.exists(case["must_not_exist"])


def _checked_deltas(name: str, base) -> tuple[dict, dict]:
    """Our reader's s·B@N@A (and s·b) per module, asserted equal to the independent merge."""
    adapter = read_adapter(CASES / name, base)
    ours = {ModelSpec.module_path(*k): s.delta() for k, s in adapter.sites.items()}
    our_bias = {ModelSpec.module_path(*k): s.bias_delta() for k, s in adapter.sites.items() if s.bias is not None}
    ref, ref_bias = file_deltas(CASES / name)
    assert ours.keys() == ref.keys() and our_bias.keys() == ref_bias.keys()
    for module in ref:
        assert max_rel_err(ours[module], ref[module]) < 1e-6, module
    for module in ref_bias:
        assert max_rel_err(our_bias[module], ref_bias[module]) < 1e-6, module
    return ours, our_bias


@pytest.mark.parametrize("name", ACCEPT)
def test_accept_case_reproduces_reference_greedy_tokens(name, base_fp32, work_model, base_greedy):
    case = load_case(name)
    report = inspect_adapter(CASES / name, base_fp32)
    assert report.tied == bool(case.get("nystrom_tied"))
    deltas, biases = _checked_deltas(name, base_fp32)
    with merged(work_model, deltas, biases) as model:
        for ref in case["references"]:
            assert greedy_matches(forced_greedy(model, ref), ref), ref["greedy_token_ids"]
    if case.get("differs_from_base"):  # our tokens equal ref's up to a near-tie, and ref leaves base before it
        assert any(next((i for i, (a, b) in enumerate(zip(ref["greedy_token_ids"], b["greedy_token_ids"]))
                         if a != b), 99) < first_near_tie(ref) for ref, b in zip(case["references"], base_greedy))


def test_true_greedy_decoding_on_the_nlora_case(base_fp32, work_model):
    # One case decoded step by step with the KV cache, as a server would, not teacher-forced.
    case = load_case("nlora-reference-format")
    deltas, biases = _checked_deltas("nlora-reference-format", base_fp32)
    with merged(work_model, deltas, biases) as model:
        ref = case["references"][0]
        assert greedy_matches(greedy(model, ref["prompt_token_ids"]), ref)
