"""The engine imports without the front ends' libraries: the GPU image has torch, triton and
transformers but not grpc, FastAPI, prometheus_client or gguf (issue: the engine on CUDA)."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ["grpc", "fastapi", "starlette", "uvicorn", "prometheus_client", "gguf", "google.protobuf"]
PROBE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any import of it now raises ImportError
import nlora_serve.engine.llm_engine, nlora_serve.engine.core, nlora_serve.engine.runner.memory
import nlora_serve.engine.model.attention, nlora_serve.models.dummy, nlora_serve.adapters.runtime.manager
print("imported")
"""


def test_engine_imports_without_front_end_libraries():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]


def test_the_probe_would_notice_a_front_end_import():
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("import nlora_serve.engine.llm_engine",
                                                              "import nlora_serve.serving.metrics")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "halted; None in sys.modules" in proc.stderr
