"""bench/ scripts run as ``python bench/X.py``, which puts bench/ first on ``sys.path``: a script
named like an installed module shadows it for everything the script imports (bench/kernels.py
once hid Hugging Face's ``kernels``, which transformers probes for, and bench/engine.py died)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"
# Run in a fresh isolated interpreter (-I: no cwd, no PYTHONPATH), so that only what is installed
# counts, not the test folders pytest put on this process's sys.path.
PROBE = ("import importlib.util, json, sys; names = json.loads(sys.argv[1]); "
         "print(json.dumps([n for n in names if n in sys.stdlib_module_names "
         "or importlib.util.find_spec(n) is not None]))")


def _clashes(names: list[str], tmp_path: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, json.dumps(names)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_no_bench_script_shadows_an_installed_module(tmp_path):
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "adapter_kernels" in names, f"expected bench/adapter_kernels.py among {names}"
    clashes = _clashes(names, tmp_path)
    assert clashes == [], f"bench/ scripts named like installed modules: {clashes}; rename them"


def test_the_check_catches_an_installed_name(tmp_path):
    assert _clashes(["json", "torch", "no_such_module_here"], tmp_path) == ["json", "torch"]
