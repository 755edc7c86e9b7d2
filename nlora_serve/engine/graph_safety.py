"""A CPU check that a step is safe to capture as a CUDA graph (``TorchDispatchMode``).

A CUDA graph replays the kernels it recorded with the addresses it recorded, and nothing of the
Python that issued them runs again. So a captured step must not
  - read a tensor back to the host or produce a shape from data: ``item``, ``nonzero``,
    ``unique``... (a sync, which capture refuses, or a shape frozen at capture), nor build a
    tensor from host data inside the step (``torch.tensor(...)``: a host copy baked in);
  - read, at replay, any tensor from outside the step (weights, KV cache, adapter pools, static
    inputs) at an address the capture did not read: that is the stale pointer a grown pool
    (``TiedPool.grow``) or a newly allocated table (``LoraPool``) would leave behind.
:class:`GraphSafetyMode` enforces both on any device, CPU tensors included, so the engine's CUDA
path (Triton under ``TRITON_INTERPRET=1``) is checked in CI. Tensors an op of the step itself
produced are the graph's own memory (its private pool) and may be anywhere.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
# ops that sync with the host or whose output shape depends on tensor values
FORBIDDEN = {_aten._local_scalar_dense.default, _aten.item.default, _aten.nonzero.default,
             _aten.nonzero_static.default, _aten.unique_consecutive.default, _aten._unique2.default,
             _aten._unique.default, _aten.unique_dim.default, _aten.masked_select.default,
             _aten.is_nonzero.default, _aten.equal.default, _aten.lift_fresh.default,
             _aten.lift_fresh_copy.default}


class GraphSafetyError(AssertionError):
    """A step did something a CUDA graph cannot replay; the message names the op or tensor."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class GraphSafetyMode(TorchDispatchMode):
    """Record (``capture=True``) or check (``capture=False``) one step's ops.

    Use one instance per graph: enter it with ``capture=True`` around the captured call, then
    with ``capture=False`` around each replay. ``external`` holds the storages the capture read
    that no op of the step produced.

    Raises (on exit of the op that breaks a rule):
        GraphSafetyError: a forbidden op; ``repeat_interleave`` without ``output_size``; or, at
            replay, a tensor from outside the step at an address the capture did not read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.external: set[int] = set()
        self.capture = True
        self._produced: set[int] = set()
        self.ops = 0  # ops seen in the last call (a check that saw nothing proves nothing)

    def run(self, capture: bool) -> GraphSafetyMode:
        self.capture, self._produced, self.ops = capture, set(), 0
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in FORBIDDEN:
            raise GraphSafetyError(f"{func} in a captured step: it syncs with the host or its shape depends on data")
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise GraphSafetyError("repeat_interleave without output_size: its shape depends on data")
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self._produced:
                ptr = _storage(t)
                if self.capture:
                    self.external.add(ptr)
                elif ptr not in self.external:
                    raise GraphSafetyError(
                        f"{func} reads a {tuple(t.shape)} {t.dtype} tensor from outside the step at an address "
                        "the capture did not read: a graph would replay the old address (recapture after a pool "
                        "grows or allocates)")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel():
                self._produced.add(_storage(t))
        return out
