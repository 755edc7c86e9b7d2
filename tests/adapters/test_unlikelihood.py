"""Token-level unlikelihood in ``adapters tune`` (Welleck et al., ICLR 2020; fixed negative set):
the loss term against a float64 reference (also where p(U) → 1, where 1 − p cancels in float32),
the token set against an independent decode of the vocabulary, the errors (library and CLI), and a
short tune run in which the negative tokens' probability drops further than with λ = 0.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import string

import pytest
import torch

from nlora_serve.adapters.tune.train import TuneConfig, tune
from nlora_serve.adapters.tune.data import IGNORE, encode, read_examples
from nlora_serve.adapters.tune.unlikelihood import unlikelihood_sum, unlikely_token_mask
from nlora_serve.cli import main as cli_main
from nlora_serve.errors import AdapterError


def reference_term(logits: torch.Tensor, targets: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """Σ_t −log(1 − Σ_{v ∈ U, v ≠ x_t} p_t(v)), straight from the definition in float64."""
    p = torch.softmax(logits.double(), dim=-1)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(targets)):
        mass = sum(p[t, v] for v in range(p.shape[1]) if unlikely[v] and v != targets[t])
        total = total - torch.log(1 - mass)
    return total


def test_term_matches_a_float64_reference_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 7, generator=gen)).requires_grad_(True)
    unlikely = torch.tensor([False, True, True, False, False, True, False])
    targets = torch.tensor([0, 1, 3, 5, 6, 2])  # positions 1, 3 and 5 have their target inside U
    got = unlikelihood_sum(logits, targets, unlikely)
    ref_logits = logits.detach().double().requires_grad_(True)
    want = reference_term(ref_logits, targets, unlikely)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_term_is_stable_where_the_negative_set_takes_almost_all_mass():
    # U holds 1 - 3e-26 of the mass: 1 - p(U) is 0 in float32, the log-sum-exp form is not.
    logits = torch.tensor([[60.0, 60.0, 0.0, 1.0]])
    unlikely = torch.tensor([True, True, False, False])
    got = unlikelihood_sum(logits, torch.tensor([2]), unlikely)
    want = torch.logsumexp(torch.tensor([60.0, 60.0, 0.0, 1.0], dtype=torch.float64), 0) - torch.logsumexp(
        torch.tensor([0.0, 1.0], dtype=torch.float64), 0)  # hand: −log(p2 + p3) = lse(all) − lse(2, 3)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert float(unlikelihood_sum(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([True, True, False, False]))
                 ) == pytest.approx(-2 * math.log(0.75))  # hand: p_t(U \\ {x_t}) = 1/4 at both positions


def test_token_set_is_every_text_token_with_a_capital_and_never_a_special_one(base_fp32):
    tok = base_fp32.tokenizer()
    mask = unlikely_token_mask(tok, "[A-Z]", 49152)
    want = {i for i in range(len(tok)) if any(c in string.ascii_uppercase for c in tok.decode([i]))}
    assert set(torch.nonzero(mask).flatten().tolist()) == want - set(tok.all_special_ids)
    assert not mask[tok.convert_tokens_to_ids("<|im_end|>")]
    assert mask[tok(" Nile", add_special_tokens=False).input_ids[0]]
    assert not unlikely_token_mask(tok, "end", 49152)[tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("pattern, message", [("[A-Z", "is not a regular expression"),
                                              (r"<\|im_end\|>", "matches no token"),
                                              ("", "matches every token")])
def test_bad_patterns_are_refused(base_fp32, pattern, message):
    with pytest.raises(AdapterError, match=message):
        unlikely_token_mask(base_fp32.tokenizer(), pattern, 49152)


def test_config_refuses_a_weight_without_tokens_and_defaults_to_one():
    with pytest.raises(AdapterError, match="needs --unlikely-tokens"):
        TuneConfig(unlikelihood_weight=2.0)
    with pytest.raises(AdapterError, match="finite and >= 0"):
        TuneConfig(unlikely_tokens="[A-Z]", unlikelihood_weight=-1.0)
    assert TuneConfig(unlikely_tokens="[A-Z]").unlikelihood_weight == 1.0
    assert TuneConfig().unlikelihood_weight == 0.0


def test_cli_names_the_bad_pattern_before_loading_anything(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    argv = ["adapters", "tune", "--model", str(tmp_path / "no-such-model"), "--data", str(data),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert cli_main([*argv, "--unlikely-tokens", "[A-Z"]) == 2
    assert "--unlikely-tokens '[A-Z' is not a regular expression" in capsys.readouterr().err
    assert cli_main([*argv, "--unlikelihood-weight", "2"]) == 2
    assert "needs --unlikely-tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


RESPONSE = "the code word is pineapple."  # lower case: capitals are what the base model would add
CFG = dict(rank=4, targets=["q_proj", "v_proj"], n_init="zeros", lr=0.05, steps=4, batch_size=4, held_out=0.25,
           seed=3, max_len=96, unlikely_tokens="[A-Z]")


@functools.cache
def capital_tokens(tok) -> torch.Tensor:
    """bool [len(tok)]: tokens with an ASCII capital, special ones excluded (an independent mask:
    the test's own decode of the vocabulary)."""
    special = set(tok.all_special_ids)
    return torch.tensor([any(c in string.ascii_uppercase for c in tok.decode([i])) and i not in special
                         for i in range(len(tok))])


@torch.no_grad()
def capital_mass(model, tok) -> float:
    """Mean float64 probability of tokens with an ASCII capital (:func:`capital_tokens`) over the
    response positions of eight prompts no run trained on, in one batch (the eight encode to one
    length: no padding)."""
    encoded = [encode(tok, [{"role": "user", "content": f"Request {i}: what is the code word?"},
                            {"role": "assistant", "content": RESPONSE}], 96) for i in range(100, 108)]
    assert len({len(ids) for ids, _ in encoded}) == 1, [len(ids) for ids, _ in encoded]
    ids, labels = torch.tensor([ids for ids, _ in encoded]), torch.tensor([labels for _, labels in encoded])
    keep = labels[:, 1:] != IGNORE
    logits = model(ids).logits[:, :-1][keep]  # [response positions, vocab]
    p = torch.softmax(logits.double(), dim=-1)[:, : len(tok)]
    return float(p[:, capital_tokens(tok)].sum()) / int(keep.sum())


def test_unlikelihood_lowers_the_negative_mass_against_the_same_run_without_it(base_fp32, hf_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Request {i}: what is the code word for box {i * 7}?",
                                        "response": RESPONSE}) + "\n" for i in range(16)))
    examples, tok, runs = read_examples(data), base_fp32.tokenizer(), {}
    for weight in (0.0, 10.0):
        model = copy.deepcopy(hf_model)
        result = tune(base_fp32, examples, TuneConfig(**CFG, unlikelihood_weight=weight), model=model, progress=False)
        runs[weight] = (result, capital_mass(model, tok))
    base_mass = capital_mass(hf_model, tok)
    (plain, plain_mass), (ul, ul_mass) = runs[0.0], runs[10.0]
    assert plain.held_out_before == ul.held_out_before  # same seed, same split, same start
    # Four AdamW steps on r = 4 move N little (Adam's step size does not grow with λ): measured
    # 0.138 (base) → 0.133 (λ = 0) → 0.104 (λ = 10); most of the mass is the first token, where the
    # base model wants "The". Cross-entropy alone barely moves it; the unlikelihood term does.
    assert ul_mass < 0.85 * plain_mass and plain_mass < base_mass, (base_mass, plain_mass, ul_mass)
    assert ul.unlikely_after < 0.85 * plain.unlikely_after, (plain.unlikely_after, ul.unlikely_after)
