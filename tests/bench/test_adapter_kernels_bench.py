"""bench/adapter_kernels.py (issue 19's GPU table) runs end to end on the CPU under the Triton
interpreter at a tiny shape, in a subprocess (the interpreter flag must be set before any kernel
module is imported, and must not leak into this process). Its layer shapes are checked against the
models' published sizes and its cost rule against hand-computed rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
import adapter_kernels as ak
import tune_adapter_kernels as tune
from nlora_serve.kernels.triton_ops import config
res = ak.main(["--tokens", "4", "--rounds", "1", "--out", sys.argv[1]])
cfg_file = Path(sys.argv[1]).parent / "Tiny_Device.json"
cfg_file.write_text(json.dumps({"mix": {"16": {"BLOCK_T": 4}}}))  # another op's entry: kept
tuned = tune.main(["--tokens", "4", "--rounds", "1", "--candidates", "2", "--out", str(cfg_file)])
config._CONFIG_DIR = cfg_file.parent
looked_up = config.get_config("tied_fused.fp32", 16, "Tiny Device")
t = {"base": 100e-6, "tied64": 103.5e-6, "lora8": 114e-6}
print(json.dumps({"rows": res["rows"], "tuned": tuned, "looked_up": looked_up, "cands": tune.CANDIDATES[:2], "llama": ak.layer_groups("llama-8b"),
                  "default": ak.layer_groups("default"),
                  "hand": [ak.cost_row("s", "bf16", n, p, t) for n in (64, 4096) for p in ("tied64", "lora8")]}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "adapter_kernels.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), json.loads(out.read_text())


def test_every_path_runs_and_is_written(run):
    printed, written = run
    assert written["rows"] == printed["rows"]
    rows = written["rows"]
    assert [r["path"] for r in rows] == ["tied64", "tied64_tiled", "tied64_fused", "tied64_fused_p64", "tied64_fused_n128",
                                          "tied64_fused_t64", "tied64_fused_k256", "tied64_zcols", "family64",
                                          "family64_grouped", "lora8", "lora8_grouped", "lora8_w64",
                                          "lora8_w64_grouped"]
    for r in rows:
        form = "fused" if "fused" in r["path"] or "zcols" in r["path"] else "decode"
        assert (r["shape"], r["dtype"], r["tokens"], r["form"]) == ("tiny", "fp32", 4, form)
        assert r["layer_s"] > 0 and r["base_s"] > 0
        assert r["cost_pct"] == pytest.approx(100 * (r["layer_s"] - r["base_s"]) / r["base_s"])


def test_layer_shapes_are_the_models(run):
    # SmolLM2-135M: hidden 576, 9 q / 3 kv heads of 64, intermediate 1536; Llama-3-8B: hidden 4096,
    # 32 q / 8 kv heads of 128, intermediate 14336. Fused GEMMs: qkv, o, gate_up, down.
    printed, _ = run
    assert printed["default"] == [[576, [576, 192, 192]], [576, [576]], [576, [1536, 1536]], [1536, [576]]]
    assert printed["llama"] == [[4096, [4096, 1024, 1024]], [4096, [4096]], [4096, [14336, 14336]],
                                [14336, [4096]]]


def test_cost_against_issue_targets(run):
    # base 100 us; tied +3.5 us = 3.5 % (target 3 % at T ≤ 256, 5 % above); lora8 +14 us = 14 %
    # (target 10 % / 15 %)
    hand = {(r["tokens"], r["path"]): r for r in run[0]["hand"]}
    assert hand[(64, "tied64")]["cost_pct"] == pytest.approx(3.5)
    assert not hand[(64, "tied64")]["meets_target"] and hand[(4096, "tied64")]["meets_target"]
    assert hand[(64, "lora8")]["target_pct"] == 10 and hand[(4096, "lora8")]["target_pct"] == 15
    assert not hand[(64, "lora8")]["meets_target"] and hand[(4096, "lora8")]["meets_target"]
    assert hand[(64, "tied64")]["adapter_s"] == pytest.approx(3.5e-6)


def test_tuning_writes_the_file_the_launchers_read(run):
    printed, _ = run
    tuned = printed["tuned"]
    assert tuned["mix"] == {"16": {"BLOCK_T": 4}}  # merged, not overwritten
    best = tuned["tied_fused.fp32"]["16"]
    assert best in printed["cands"]
    assert {k: printed["looked_up"][k] for k in best} == best  # what tied_fused will launch with
