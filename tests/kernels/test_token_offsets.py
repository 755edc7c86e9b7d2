"""The step budget against the Triton adapter kernels' int32 row offsets (kernels/triton_ops/launch.py).

bgmv / sgmv / tied kernels compute a token's row as ``token * row stride`` in int32: at llama-8b's
fused gate/up width (28,672) that wraps from 74,898 tokens per step, silently. The engine refuses
such a budget at start-up (EngineCore, kernel_backend "triton" with adapters)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlora_serve.kernels.triton_ops.launch import check_token_offsets
from nlora_serve.models.spec import read_spec

LLAMA_8B = Path(__file__).resolve().parents[2] / "bench" / "models" / "llama-8b"


def test_llama_8b_budget_limit_is_its_gate_up_width():
    spec = read_spec(LLAMA_8B)
    widest = 2 * spec.intermediate_size  # 28,672: wider than q/k/v (6,144) and down's input (14,336)
    limit = (2 ** 31 - 1) // widest
    check_token_offsets(8192, spec)
    check_token_offsets(limit, spec)
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens per step x {widest} columns .* at most {limit}"):
        check_token_offsets(limit + 1, spec)
