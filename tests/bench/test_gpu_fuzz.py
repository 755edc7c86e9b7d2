"""bench/gpu_fuzz.py on the CPU: the fuzz that bench/gpu_check.sh's extra call runs on a GPU (15
minutes, drawn by chance), here one round of it on the tiny model (1 layer) with the Triton kernels
under the interpreter, async scheduling on and ``max_loras`` 1, against transformers. The round of
:data:`SEED` is a burst of a tied (rank 16), a LoRA (rank 16, attention only) and a base request
(34, 8 and 29 prompt tokens at a 32-token step budget: chunked prefill in mixed steps, then the
three decoding together) with a hot swap of a tied tenant's N; its tokens must be transformers'
greedy ones. The check itself is tested on made-up logits: a wrong token, a wrong length, a near-tie.

Measured on the CPU, a slot fault injected (each sequence's adapter slots given to the next one in
the step, adapter_layer.AdapterHook.begin_step): in the per-token form only (decode steps), this
round fails with 3 of its 3 requests mismatched; in both forms, 3 of 3 (first differing position
0); unchanged, it passes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined (as the engine tests)

import torch  # noqa: E402

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_fuzz  # noqa: E402
from test_gpu_check_commands import SCRIPT, _steps  # noqa: E402 (tests/bench, on sys.path as pytest puts it)

# round 0 of this seed: tied16 34 tokens / 4 new, lora16attn 8 / 4, base 29 / 4, all at once, and a swap
SEED = 14441


def test_one_round_under_the_interpreter_equals_transformers(tmp_path):
    out = tmp_path / "fuzz.json"
    code = gpu_fuzz.main(["--device", "cpu", "--layers", "1", "--rounds", "1", "--seconds", "0",
                          "--seed", str(SEED), "--out", str(out)])
    summary = json.loads(out.read_text())
    (row,) = summary["rounds"]
    assert code == 0 and summary["pass"], row["mismatches"] or row["left"]
    assert row["tenants"] == ["base", "lora16attn", "tied16"] and row["swap"], row
    assert row["tokens"] == 12 and row["aborted"] == 0, row
    assert row["engine"]["eager_steps"] >= 5, row["engine"]  # 71 prompt tokens at 32 a step, then decodes


class _Fixed:
    """A reference model whose logits are given: [1, len(ids), V]."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, ids):
        return type("Out", (), {"logits": self.logits[None, : ids.shape[1]]})()


class _World:
    def __init__(self, logits):
        self.model = _Fixed(logits)

    def reference(self, tenant, nset):
        return self.model


def test_the_check_finds_the_first_wrong_token_and_passes_near_ties():
    # prompt of 2 tokens, then 3 generated: the logits at positions 1, 2, 3 decide them
    logits = torch.zeros(5, 6)
    logits[1, 4], logits[2, 1], logits[3, 5] = 1.0, 1.0, 1.0
    logits[2, 3] = 1.0 - 5e-4  # a near-tie at the second token
    world, job = _World(logits), gpu_fuzz.Job("r0-0", None, [0, 0], 3, 0, None)
    result = {"tokens": [4, 1, 5], "finish": "length", "version": 0, "cached": 0, "aborted": False}
    assert gpu_fuzz.check(world, job, result, 0, 1e-3) is None
    assert gpu_fuzz.check(world, job, {**result, "tokens": [4, 3, 5]}, 0, 1e-3) is None  # within the tie margin
    bad = gpu_fuzz.check(world, job, {**result, "tokens": [4, 3, 0]}, 0, 1e-4)
    assert (bad["first_differing_position"], bad["got"], bad["want"], bad["bad_positions"]) == (1, 3, 1, 2), bad
    short = gpu_fuzz.check(world, job, {**result, "tokens": [4, 1]}, 0, 1e-3)
    assert short["what"] == "length/finish", short
    aborted = {**result, "tokens": [4], "finish": "abort", "aborted": True}
    assert gpu_fuzz.check(world, job, aborted, 0, 1e-3) is None
    assert gpu_fuzz.check(world, job, {**aborted, "aborted": False}, 0, 1e-3)["what"] == "length/finish"
    failed = {**result, "tokens": [], "finish": "error", "error": "EngineError: request r0-0 failed: boom"}
    assert gpu_fuzz.check(world, job, failed, 0, 1e-3) == {"what": "error", "got": failed["error"]}


def test_gpu_check_runs_the_fuzz_on_cuda_in_its_extra_call():
    text = SCRIPT.read_text()
    extra = text[text.index('if [ "${1:-}" = extra ]'):text.index("\nfi\n")]
    (words,) = [words for name, words in _steps(extra) if name == "fuzz"]
    assert words[:2] == ["$PY", "bench/gpu_fuzz.py"] and "--device" not in words, words  # cuda, its default
