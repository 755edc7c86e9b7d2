"""What the fold-cache tests share (tests/engine/test_vllm_fold_cache.py, test_vllm_fold_bound.py):
a tied adapter's versions admitted to a VllmResidency, vLLM's remove_lora as the cache sees it,
the fold folders on disk, and a count of the folds written."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nlora_serve.adapters.loader import read_adapter
from nlora_serve.engine.vllm_backend import fold_cache as fold_cache_module
from nlora_serve.engine.vllm_backend.adapters import VllmResidency

CASES = Path(__file__).parents[1] / "data" / "cases"


@pytest.fixture(scope="module")
def tied(base_fp32):
    return read_adapter(CASES / "inttune-nystrom-tied", base_fp32)


def residency_of(base_fp32, root: Path) -> VllmResidency:
    return VllmResidency(root, torch.float32, tuple(base_fp32.weight(0, "q_proj").shape))


def versions_of(residency: VllmResidency, adapter, n: int) -> list:
    versions = [SimpleNamespace(adapter=adapter, pool=None, slot=None, held_bytes=0) for _ in range(n)]
    for v in versions:
        residency.admit(v)
    return versions


def folders(root: Path) -> set[int]:
    return {int(p.name) for p in root.iterdir() if p.is_dir()}


class FakeVllm:
    """vLLM's remove_lora as the cache sees it: records which folders still existed when called."""

    def __init__(self, root: Path):
        self.root, self.removed = root, []

    async def remove(self, lora_id: int, folder: Path) -> None:
        self.removed.append((lora_id, folder.is_dir()))  # remove_lora first: the folder is still there
        await asyncio.sleep(0.01)  # answered between vLLM's steps
        shutil.rmtree(folder, ignore_errors=True)


def count_folds(monkeypatch) -> list[int]:
    written = []
    real = fold_cache_module.write_folded_lora

    def counted(adapter, out_dir):
        written.append(int(out_dir.name))
        return real(adapter, out_dir)
    monkeypatch.setattr(fold_cache_module, "write_folded_lora", counted)
    return written
