"""Finite values that overflow when served are refused at load (hostile review round four).

An N of 3e38 (or 1e30) is finite, so it passed the NaN/inf check, was registered, and then every
request on the tenant failed. The references here are computed from the tensors in float64 with
torch alone: for a rank-1 site the worst output over activations |x_i| <= X is exactly
X · max_i Σ_j |s·B·N·A|_ij, which must stay under sqrt(bfloat16's max / out).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nlora_serve.adapters.bounds import MAX_ACTIVATION
from nlora_serve.adapters.loader import read_adapter, read_adapter_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.errors import AdapterError

CASES = Path(__file__).resolve().parents[1] / "data" / "cases"
TIED = "inttune-nystrom-tied"
SITE = "base_model.model.model.layers.0.self_attn.q_proj"
OUT = IN = 576  # q_proj of SmolLM2-135M
LIMIT = math.sqrt(torch.finfo(torch.bfloat16).max / OUT)  # the output's sum of squares stays finite


def rank_one(n: float, a_scale: float = 1.0) -> tuple[bytes, bytes]:
    """A LoRA r=1 on layer 0's q_proj with A, B of seeded values and N = [[n]]: (config, weights)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{SITE}.lora_A.weight": a_scale * torch.rand(1, IN, generator=gen),
               f"{SITE}.lora_N.weight": torch.tensor([[n]]),
               f"{SITE}.lora_B.weight": torch.rand(OUT, 1, generator=gen)}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    return json.dumps(config).encode(), safetensors.torch.save(tensors)


def worst_output(weights: bytes) -> float:
    """max over |x_i| <= X of |s·B·N·A x|∞, in float64 from the file (s = alpha / r = 2)."""
    t = {k: v.to(torch.float64) for k, v in safetensors.torch.load(weights).items()}
    delta = 2.0 * t[f"{SITE}.lora_B.weight"] @ t[f"{SITE}.lora_N.weight"] @ t[f"{SITE}.lora_A.weight"]
    return float(delta.abs().sum(1).max()) * MAX_ACTIVATION


@pytest.mark.parametrize("factor", [0.5, 0.999, 1.001, 2.0])
def test_the_output_bound_is_exact_for_rank_one(base_fp32, factor):
    unit = worst_output(rank_one(1.0)[1])
    config, weights = rank_one(factor * LIMIT / unit)
    assert worst_output(weights) == pytest.approx(factor * LIMIT, rel=1e-6)
    if factor < 1:
        read_adapter_bytes(config, weights, base_fp32)
    else:
        with pytest.raises(AdapterError, match=rf"tensor '{SITE}.lora_N.weight' at .*output .* over the "
                                                rf"{re.escape(f'{LIMIT:.3g}')} that keeps its sum of squares"):
            read_adapter_bytes(config, weights, base_fp32)


@pytest.mark.parametrize("n", [3e38, 1e30, -1e30])
def test_finite_but_overflowing_n_is_refused_naming_the_key(base_fp32, n):
    config, weights = rank_one(n)
    with pytest.raises(AdapterError, match=rf"tensor '{SITE}.lora_N.weight'"):
        read_adapter_bytes(config, weights, base_fp32)


def test_a_scaling_whose_products_pass_float64_is_refused_without_a_warning(base_fp32):
    """lora_alpha 1e308: the bound's products overflowed numpy's float64, and every such upload wrote
    'RuntimeWarning: overflow encountered in scalar multiply' to the server's stderr."""
    config, weights = rank_one(1.0)
    config = json.dumps({**json.loads(config), "lora_alpha": 1e308}).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AdapterError, match=rf"^tensor '{SITE}.lora_N.weight' at .*: scaling times N can "
                                                r"reach 1e\+308, over the 3.39e\+38"):
            read_adapter_bytes(config, weights, base_fp32)


def test_a_value_that_is_inf_in_bfloat16_is_refused_on_a_float32_base_too(base_fp32):
    """3.4e38 is a float32 but rounds to inf in bfloat16: the adapter must not depend on --dtype."""
    big = 3.4e38
    assert math.isfinite(torch.tensor(big).item()) and torch.tensor(big).to(torch.bfloat16).isinf()
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, IN, generator=gen) * 1e-30
    a[0, 3] = big
    tensors = {f"{SITE}.lora_A.weight": a, f"{SITE}.lora_B.weight": torch.zeros(OUT, 1)}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    with pytest.raises(AdapterError, match=rf"tensor '{SITE}.lora_A.weight': a row of \|A\| sums to 3.4e\+38, "
                                            r"over 3.39e\+38 \(bfloat16's largest"):
        read_adapter_bytes(json.dumps(config).encode(), safetensors.torch.save(tensors), base_fp32)


def test_every_accept_case_is_far_inside_the_bounds(base_fp32):
    """The bounds must not refuse real adapters: each case's worst output, from its files in
    float64, is at least 1e10 below the limit (and it loads)."""
    for case in sorted(p for p in CASES.iterdir() if (p / "case.json").is_file()):
        if json.loads((case / "case.json").read_text())["expect"] != "accept":
            continue
        read_adapter(case, base_fp32)
        cfg = json.loads((case / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        stored = safetensors.torch.load_file(case / "adapter_model.safetensors")
        tensors = {k: v.to(torch.float64) for k, v in stored.items()}
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                n = tensors.get(f"{module}.lora_N.weight", torch.eye(a.shape[0], dtype=torch.float64))
                delta = s * tensors[f"{module}.lora_B.weight"] @ n @ a
                assert float(delta.abs().sum(1).max()) * MAX_ACTIVATION < 1e-10 * LIMIT, (case.name, key)


def test_swap_of_an_overflowing_n_is_refused_and_the_tenant_serves_on(base_fp32, tmp_path):
    manager = AdapterManager(base_fp32, tmp_path / "store")
    before = manager.register_dir("t", CASES / TIED)
    tensors = safetensors.torch.load_file(before.path / "adapter_model.safetensors")
    key = sorted(tensors)[5]
    for value in (3e38, 1e30):
        bad = dict(tensors, **{key: torch.full_like(tensors[key], value)})
        with pytest.raises(AdapterError, match=rf"tensor '{key}'"):
            manager.swap("t", safetensors.torch.save(bad))
    assert manager.registry.get("t") is before and manager.registry.store.versions("t") == [before.version]
    ok = manager.swap("t", safetensors.torch.save({k: 1.5 * v for k, v in tensors.items()}))
    assert ok.version == before.version + 1


def test_a_stored_overflowing_adapter_is_not_served_after_a_restart_nor_passed_by_inspect(base_fp32, tmp_path, caplog):
    """One written by a server without these checks: the store keeps it, the registry skips it
    with the reason, and `adapters inspect` refuses it the same way."""
    import shutil

    from nlora_serve.adapters.inspect import inspect_adapter

    manager = AdapterManager(base_fp32, tmp_path / "store")
    good = manager.register_dir("good", CASES / TIED)
    bad = tmp_path / "store" / "bad" / f"{1:08d}"
    shutil.copytree(good.path, bad)
    (bad / "SHA256SUMS").unlink()  # (a server without these checks recorded no sha256 either)
    tensors = safetensors.torch.load_file(bad / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], 1e30)
    safetensors.torch.save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=rf"tensor '{re.escape(key)}'"):
        inspect_adapter(bad, base_fp32)
    restarted = AdapterManager(base_fp32, tmp_path / "store")
    assert {v.name for v in restarted.versions()} == {"good"}
    assert any("bad" in r.getMessage() and key in r.getMessage() for r in caplog.records)
