"""A CPU check that a step is safe to capture as a CUDA graph (``TorchDispatchMode``).

A CUDA graph replays the kernels it recorded with the addresses it recorded, and nothing of the
Python that issued them runs again. So a captured step must not
  - read a tensor back to the host or produce a shape from data: ``item``, ``nonzero``,
    ``unique``... (a sync, which capture refuses, or a shape frozen at capture), nor build a
    tensor from host data inside the step (``torch.tensor(...)``: a host copy baked in);
  - read, at replay, any tensor from outside the step (weights, KV cache, adapter pools, static
    inputs) at an address the capture did not read: that is the stale pointer a grown pool
    (``TiedPool.grow``) or a newly allocated table (``LoraPool``) would leave behind;
  - launch, at replay, anything other than what the capture launched: the same ops and Triton
    kernels in the same order, with the same grids, scalar arguments and tensor shapes, strides
    and offsets. A replay on the CPU re-runs the Python, so a host value of the step (a token
    count, a rank, a slice end) that reaches a kernel is recomputed there, where a graph would
    replay the value it captured: the CPU would pass and the GPU go wrong.
:class:`GraphSafetyMode` enforces these on any device, CPU tensors included, so the engine's CUDA
path (Triton under ``TRITON_INTERPRET=1``, whose launches the mode sees too) is checked in CI.
Tensors an op of the step itself produced are the graph's own memory (its private pool) and may be
anywhere. Ops that launch nothing (views: their outputs alias their inputs) are not launches: a
view cached at capture and reused at replay is the same address either way.
"""

from __future__ import annotations

import threading

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


def _arg(x):
    """What a launch records of one argument: a tensor's layout, a plain value itself."""
    if isinstance(x, torch.Tensor):
        return "tensor", tuple(x.shape), tuple(x.stride()), x.storage_offset(), x.dtype
    if x is None or isinstance(x, int | float | bool | str | torch.dtype | torch.device | torch.layout
                                  | torch.memory_format):
        return x
    return type(x).__name__


def _launches_nothing(func, inputs: set[int], outputs: list[torch.Tensor]) -> bool:
    """A view: writes no argument and every output aliases an input (no kernel on a GPU)."""
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
    return bool(outputs) and not writes and all(_storage(t) in inputs for t in outputs)


_active = threading.local()  # the mode whose Triton launches this thread records (Triton interpreter)
_triton_hook_lock = threading.Lock()


def _install_triton_hook() -> None:
    """Route Triton interpreter launches (``kernel[grid](...)``) through the active mode, once."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no Triton: nothing to record
        return
    with _triton_hook_lock:
        if getattr(InterpretedFunction.run, "_graph_safety", False):
            return
        original = InterpretedFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            mode = getattr(_active, "mode", None)
            if mode is None or mode._in_kernel:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            mode._launch(getattr(self.fn, "__name__", repr(self)), grid, args, kwargs)
            mode._in_kernel = True  # the interpreter's own torch calls are no launches of the step
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                mode._in_kernel = False

        run._graph_safety = True
        InterpretedFunction.run = run


class GraphSafetyMode(TorchDispatchMode):
    """Record (``capture=True``) or check (``capture=False``) one step's ops.

    Use one instance per graph: enter it with ``capture=True`` around the captured call, then
    with ``capture=False`` around each replay. ``external`` holds the storages the capture read
    that no op of the step produced.

    Raises (on exit of the op that breaks a rule):
        GraphSafetyError: a forbidden op; ``repeat_interleave`` without ``output_size``; or, at
            replay, a tensor from outside the step at an address the capture did not read, or
            (on exit of the replay) launches other than the capture's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.external: set[int] = set()
        self.capture = True
        self._produced: set[int] = set()
        self.ops = 0  # ops seen in the last call (a check that saw nothing proves nothing)
        self.launches: list[tuple] = []  # the capture's launches, in order (see the module docstring)
        self._calls: list[tuple] = []  # the current call's
        self._in_kernel = False  # inside a Triton interpreter launch

    def run(self, capture: bool) -> GraphSafetyMode:
        self.capture, self._produced, self.ops, self._calls = capture, set(), 0, []
        return self

    def __enter__(self):
        _install_triton_hook()
        self._outer, _active.mode = getattr(_active, "mode", None), self
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        _active.mode = self._outer
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        if self.capture:
            self.launches = self._calls
        elif self._calls != self.launches:
            self._refuse_replay()

    def _refuse_replay(self) -> None:
        got, want = self._calls, self.launches
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise GraphSafetyError(
            f"a replay launched other than the capture did, at launch {i} (capture {len(want)}, replay {len(got)}): "
            f"captured {want[i] if i < len(want) else 'nothing'}, replayed {got[i] if i < len(got) else 'nothing'}; "
            "a graph would replay the captured grid, scalars and shapes (a host value of the step reached a kernel)")

    def _check_external(self, func, t: torch.Tensor) -> None:
        ptr = _storage(t)
        if self.capture:
            self.external.add(ptr)
        elif ptr not in self.external:
            raise GraphSafetyError(
                f"{func} reads a {tuple(t.shape)} {t.dtype} tensor from outside the step at an address "
                "the capture did not read: a graph would replay the old address (recapture after a pool "
                "grows or allocates)")

    def _launch(self, name: str, grid, args, kwargs) -> None:
        """A Triton kernel launch: its tensors are reads like an op's, its grid and scalars recorded."""
        self.ops += 1
        for t in args:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self._produced:
                self._check_external(name, t)
        self._calls.append((name, grid if isinstance(grid, tuple) else "a callable grid",
                            tuple(_arg(a) for a in args), tuple(sorted((k, _arg(v)) for k, v in kwargs.items()))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel:
            return func(*args, **kwargs)
        self.ops += 1
        if func in FORBIDDEN:
            raise GraphSafetyError(f"{func} in a captured step: it syncs with the host or its shape depends on data")
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise GraphSafetyError("repeat_interleave without output_size: its shape depends on data")
        flat = tree_flatten((args, kwargs))[0]
        for t in flat:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self._produced:
                self._check_external(func, t)
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.numel()]
        if not _launches_nothing(func, {_storage(t) for t in flat if isinstance(t, torch.Tensor) and t.numel()},
                                 outputs):
            self._calls.append((str(func), tuple(_arg(a) for a in flat)))
        for t in outputs:
            self._produced.add(_storage(t))
        return out
