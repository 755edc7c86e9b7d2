"""A tied projection's delta handed to the native op that consumes the projection's output
(``cpu/tied_delta.h``): the ctypes mirrors of its C structs and the Python objects the
adapter hook passes to ``LayerOps`` (kernels/cpu/layer_ops.py). Built by
:meth:`nlora_serve.kernels.cpu.native.NativeOps.tied_step` / ``tied_delta``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nlora_serve.kernels.cpu.native import TiedProjection

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class TiedPlanArgs(ctypes.Structure):
    """``tied_plan_t`` (cpu/tied_delta.h): what one :class:`TiedProjection` fixes of the tied op's arguments."""

    _fields_ = [("num_modules", ctypes.c_int), ("r", ctypes.c_int), ("n_bf16", ctypes.c_int), ("off", _P),
                ("width", _P), ("n", _P), ("bias", _P), ("n_slot_stride", _I64), ("n_row_stride", _I64), ("bt", _P)]


class TiedStepArgs(ctypes.Structure):
    """``tied_step_t`` (cpu/tied_delta.h): what one step's batch fixes (its tokens' slots, the slots' scalings)."""

    _fields_ = [("slots", _P), ("scale", _P)]


@dataclass(frozen=True, slots=True)
class TiedStep:
    """One step's tied tokens for deferred deltas (:meth:`NativeOps.tied_step`)."""

    args: TiedStepArgs  # the C struct: pointers to tok_tied_slot [T] int32 and slot_scalings [S] float32
    address: int  # of args
    num_tokens: int  # T: the step's tokens (rows of every projection output this step)
    keep: tuple  # the slot and scaling tensors args points at


class TiedDelta:
    """A fused projection's tied delta, not yet added: the op that reads the projection's output
    next adds it row by row (``LayerOps.rope``, ``silu_mul``, ``add_rms_norm``, ``add``; cpu/tied_delta.h),
    so the output is read once instead of read, written back and read again. Build with
    :meth:`NativeOps.tied_delta`; valid while its plan and step live (the step's forward).
    """

    __slots__ = ("plan", "step", "width", "dtype")

    def __init__(self, plan: TiedProjection, step: TiedStep) -> None:
        self.plan, self.step = plan, step  # held: the C call reads their structs
        self.width, self.dtype = plan.width, plan.dtype  # the output it belongs to: [step.num_tokens, width]

    @property
    def num_tokens(self) -> int:
        return self.step.num_tokens

    def addresses(self) -> tuple[int, int]:
        """(plan struct, step struct) addresses for the C call."""
        return ctypes.addressof(self.plan.delta_args), self.step.address
