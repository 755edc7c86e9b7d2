"""No blocking host-to-device copy of a Python list on the engine's step path (engine/runner/device_values.py).

``torch.tensor(values, device=...)`` on CUDA copies from pageable memory and synchronizes the
stream: the host waits for the step in flight, which undoes async scheduling's overlap. Only a
GPU shows the stall (as lost throughput, never a wrong token), so this is a source check: every
such call in the engine and the kernels' Python goes through :func:`to_device` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from nlora_serve.engine.runner.device_values import host_to_device, to_device

ROOT = Path(__file__).resolve().parents[2] / "nlora_serve"
SCANNED = ("engine", "kernels")
ALLOWED = {"engine/runner/device_values.py"}  # the helper itself (its CPU branch)


def _device_lists(path: Path) -> list[int]:
    """Lines of ``torch.tensor`` / ``torch.as_tensor`` calls given a ``device`` other than "cpu"."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("tensor", "as_tensor") and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            continue
        device = next((k.value for k in node.keywords if k.arg == "device"), None)
        if device is not None and not (isinstance(device, ast.Constant) and device.value == "cpu"):
            lines.append(node.lineno)
    return lines


def test_no_list_is_copied_to_a_device_with_a_stream_sync():
    found = []
    for part in SCANNED:
        for path in sorted((ROOT / part).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED:
                found += [f"{rel}:{line}" for line in _device_lists(path)]
    assert not found, f"torch.tensor(..., device=...) syncs a CUDA stream; use to_device: {found}"


def test_to_device_builds_the_same_tensor_on_the_cpu():
    for values, dtype in (([3, 1, 2], torch.long), ([(0, 5), (1, 7)], torch.long), ([0.5, 2.0], torch.float32),
                          ([1.5], torch.bfloat16), ([4, 5], None)):
        got = to_device(values, torch.device("cpu"), dtype)
        want = torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_sampler_indexes_no_tensor_with_a_python_list(monkeypatch):
    # a CUDA tensor indexed by a list (or any CPU index) copies the index to the device blocking:
    # a stream sync (torch's IndexingUtils: index.to(self.device())), here on every step with a
    # logprobs row (logits[wanted], tokens[wanted]); the sampler's worst case takes every path
    from nlora_serve.engine.runner.dummy_sampler import dummy_sampler_run

    seen = []
    real = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        seen.extend(type(p).__name__ for p in parts if isinstance(p, list))
        return real(self, index)

    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    step = dummy_sampler_run(logits, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert seen == [] and len(step.read()[0]) == 4


def test_prompt_logprob_targets_reach_the_device_through_a_pinned_stage(monkeypatch):
    """score() copied its [P] int64 targets with ``.to(device, non_blocking=True)`` from pageable
    memory, which on CUDA waits for the host (a stall behind the step's forward); they now go
    through device_values.host_to_device (pinned staging). The logprobs still match float64."""
    from nlora_serve.engine.sample import prompt_logprobs

    staged = []
    monkeypatch.setattr(prompt_logprobs, "host_to_device", lambda t, d: staged.append(t) or host_to_device(t, d))
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    rows = prompt_logprobs.PromptRows(torch.tensor([0, 2, 3]), torch.tensor([4, 7, 1]), [], top_k=0)
    indices = rows.indices.clone()
    scored, ranks = prompt_logprobs.score(lambda idx: logits[idx].clone(), indices, rows, 2)
    assert len(staged) == 1 and staged[0] is rows.targets
    want = torch.log_softmax(logits.double()[[0, 2, 3]], dim=-1)[[0, 1, 2], [4, 7, 1]]
    torch.testing.assert_close(scored, want, atol=1e-5, rtol=0)
    ref = torch.log_softmax(logits.double()[[0, 2, 3]], dim=-1)
    assert ranks.tolist() == (ref >= want.unsqueeze(1)).sum(dim=1).double().tolist()
    assert torch.equal(host_to_device(rows.targets, torch.device("cpu")), rows.targets)


def test_host_to_device_stages_a_pageable_tensor_in_pinned_memory(monkeypatch):
    """On CUDA (faked here: no GPU) a pageable tensor is pinned first, then copied non-blocking."""
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append(("to", device.type, non_blocking))
            return "on device"

    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    assert host_to_device(torch.tensor([1, 2]), torch.device("cuda")) == "on device"
    assert calls == ["pin", ("to", "cuda", True)]
