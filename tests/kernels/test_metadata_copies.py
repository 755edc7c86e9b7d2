"""build_adapter_batch's copies to a CUDA device are pinned and non_blocking (kernels/metadata.py).

A pageable ``.to("cuda")`` synchronizes the stream, so each of the batch's ~25 index tensors made the
host wait for the step in flight (the segment form's steps: prefill and mixed steps with adapters).
No GPU here: ``pin_memory`` and the copy to "cuda" are recorded on CPU tensors instead.
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.metadata import TIED, build_adapter_batch


def test_every_copy_to_cuda_is_pinned_and_non_blocking(monkeypatch):
    pinned, copies = set(), []
    real_to = torch.Tensor.to

    def pin_memory(self, *args, **kwargs):
        out = self.clone()
        pinned.add(id(out))
        return out

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (torch.device, str)) and torch.device(target).type == "cuda":
            copies.append((id(self) in pinned, kwargs.get("non_blocking", False)))
            rest = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking")}
            return real_to(self, *args[1:], **rest) if args[1:] or rest else self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    slots = torch.tensor([0, 0, 1, -1, 2, 2, 1], dtype=torch.int32)
    batch = build_adapter_batch(slots, torch.tensor([4, 8, 4]), torch.ones(3),
                                torch.tensor([0, 1, TIED], dtype=torch.int32), device=torch.device("cuda"))
    assert batch.num_tokens == 7 and copies
    assert all(p and nb for p, nb in copies), copies
