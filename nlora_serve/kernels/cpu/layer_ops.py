"""Native CPU ops for the decoder layer's elementwise work (``cpu/layer_ops.c``).

One pass each where torch runs 3-6 ops: RMSNorm fused with the residual add, RoPE in place on
the q/k heads, SiLU(gate) · up. The arithmetic is HF Llama's, in fp32 whatever the storage dtype
(bf16 widened on load, rounded to nearest even once on store). Loaded with the other native ops
(:func:`nlora_serve.kernels.cpu.native.load_native`); the torch ops stay the reference
(``tests/kernels/test_layer_ops.py``).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nlora_serve.kernels.cpu.tied_delta import TiedDelta

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "nlora_add_rms_norm": [_P, _I64, _I64, _P, _I64, _INT, _P, _F, _P, _I64, _INT, _INT, _P, _P],
    "nlora_rope": [_P, _I64, _I64, _INT, _INT, _P, _P, _P, _INT, _INT, _I64, _P, _P],
    "nlora_silu_mul": [_P, _I64, _I64, _I64, _P, _I64, _INT, _INT, _P, _P],
}
_DTYPES = (torch.float32, torch.bfloat16)
# below this many elements a call runs on one thread (starting a thread costs ~10-20 µs)
_PARALLEL_ELEMENTS = 1 << 16


# with a tied delta, from this many rows (the adapter ops' split, kernels/cpu/native.py PARALLEL_MIN_ROWS)
_PARALLEL_TIED_ROWS = 16


def _threads(elements: int, rows: int = 0, tied: bool = False) -> int:
    """Threads for a call over ``elements`` entries (``rows`` rows carrying a tied delta when ``tied``)."""
    if tied and rows >= _PARALLEL_TIED_ROWS:
        return torch.get_num_threads()
    return torch.get_num_threads() if elements >= _PARALLEL_ELEMENTS else 1


def _rows_ok(t: torch.Tensor) -> bool:
    """2-D with unit stride along the last dim (rows may be strided)."""
    return t.dim() == 2 and t.stride(1) == 1


_NO_TIED = (None, None)


def _check_tied(op: str, tied: TiedDelta | None, y: torch.Tensor) -> tuple[int | None, int | None]:
    """``tied``'s (plan, step) struct addresses when it belongs to ``y`` (its rows, columns and
    dtype); (None, None) without one."""
    if tied is None:
        return _NO_TIED
    if tied.num_tokens != y.shape[0] or tied.width != y.shape[1] or tied.dtype != y.dtype:
        raise ValueError(f"{op}: the tied delta is for a [{tied.num_tokens}, {tied.width}] {tied.dtype} output, "
                         f"got {tuple(y.shape)} {y.dtype}")
    return tied.addresses()


def _check_rc(op: str, rc: int) -> None:
    if rc == -2:
        raise MemoryError(f"{op}: no memory for the tied delta's scratch rows")
    if rc != 0:
        raise ValueError(f"{op}: the tied delta's rank or module count is past the native op's limits")


class LayerOps:
    """The three ops, bound to a loaded library (``ctypes.CDLL``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
            self._fns[name] = fn

    @staticmethod
    def fits(hidden: int, head_dim: int, intermediate: int) -> bool:
        """Whether a model of these sizes runs on the ops (the C side's vector widths)."""
        return hidden % 16 == 0 and head_dim % 32 == 0 and head_dim <= 256 and intermediate % 16 == 0

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     dtype: torch.dtype, tied: TiedDelta | None = None) -> torch.Tensor:
        """``x += delta`` (in place, when given), then RMSNorm of the new ``x``.

        Semantics: for every row t, h = x[t] + d[t] (d = delta, or 0 without one; with ``tied``,
        d[t] = delta[t] + Δ[t], Δ the tied delta of delta's row: Δ[t, m] = scaling[s] · B_m ·
        N_m[s] · (delta[t, m][:r] − bias_m[:r]) for s = its tied slot ≥ 0, 0 for other rows);
        x[t] = h (x changed in place); out[t] = h / sqrt(mean(h²) + eps) · weight, stored in
        ``dtype``. fp32 arithmetic: a bf16 delta is widened, d is never rounded, out is rounded
        once. ``delta`` and ``weight`` are not changed.

        Args:
            x: [T, H] float32 contiguous, the residual stream. delta: [T, H] float32 or bfloat16
                (rows may be strided), or None. weight: [H] float32. eps: as the model's config.
            dtype: float32 or bfloat16, the output's.
            tied: ``delta``'s tied delta (a projection's, :meth:`NativeOps.tied_delta`), added to
                it first: x += delta + tied, with delta read once (delta itself is not changed).
        Returns:
            [T, H] in ``dtype``: ``x / sqrt(mean(x²) + eps) * weight``.
        Raises:
            ValueError: shapes, dtypes or layouts the op does not take (H a multiple of 16), a
                tied delta without a delta or of another shape. MemoryError: no scratch memory.
        """
        t, h = x.shape
        self._check_add(x, delta, tied)
        ok = (weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape == (h,) and dtype in _DTYPES)
        if not ok:
            raise ValueError("add_rms_norm: x [T, H] float32 contiguous, H a multiple of 16, weight [H] float32, "
                             "delta like x (float32/bfloat16, unit stride in a row) or None, dtype float32/bfloat16")
        out = torch.empty(t, h, dtype=dtype)
        rc = self._fns["nlora_add_rms_norm"](
            x.data_ptr(), t, h, None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
            int(delta is not None and delta.dtype == torch.bfloat16), weight.data_ptr(), eps, out.data_ptr(), h,
            int(dtype == torch.bfloat16), _threads(t * h, t, tied is not None),
            *_check_tied("add_rms_norm", tied, delta))
        _check_rc("add_rms_norm", rc)
        return out

    def add(self, x: torch.Tensor, delta: torch.Tensor, tied: TiedDelta | None = None) -> torch.Tensor:
        """``x += delta (+ tied)`` in place: the residual add of a projection's output and its tied delta.

        Semantics: :meth:`add_rms_norm`'s first half, no norm: x[t] += delta[t] (+ Δ[t] with
        ``tied``, Δ as there) for every row t, in fp32; ``delta`` is not changed.

        Args: as :meth:`add_rms_norm`'s ``x``, ``delta`` (required) and ``tied``.
        Returns:
            ``x``.
        Raises:
            ValueError, MemoryError: as :meth:`add_rms_norm`.
        """
        t, h = x.shape
        if delta is None:
            raise ValueError("add: delta is required")
        self._check_add(x, delta, tied)
        rc = self._fns["nlora_add_rms_norm"](
            x.data_ptr(), t, h, delta.data_ptr(), delta.stride(0), int(delta.dtype == torch.bfloat16), None, 0.0,
            None, 0, 0, _threads(t * h, t, tied is not None), *_check_tied("add", tied, delta))
        _check_rc("add", rc)
        return x

    @staticmethod
    def _check_add(x: torch.Tensor, delta: torch.Tensor | None, tied: TiedDelta | None) -> None:
        ok = (x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.shape[1] % 16 == 0
              and (delta is None or (delta.shape == x.shape and delta.dtype in _DTYPES and _rows_ok(delta))))
        if not ok:
            raise ValueError("add_rms_norm: x [T, H] float32 contiguous, H a multiple of 16, "
                             "delta like x (float32/bfloat16, unit stride in a row) or None")
        if tied is not None and delta is None:
            raise ValueError("add_rms_norm: a tied delta needs the projection output (delta) it belongs to")

    def rope(self, qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             tied: TiedDelta | None = None) -> torch.Tensor:
        """Rotate ``qk`` [T, heads, D] in place by the half-rotation RoPE of HF Llama.

        Semantics: for every row t and head h < heads, with v = qk[t, h] in fp32 and p =
        positions[t]: qk[t, h] = v · cos[p] + swap_halves(v) · sin[p] (``sin``'s first half is
        negated in the tables, so this is HF's q · cos + rotate_half(q) · sin), rounded once to
        qk's dtype. With ``tied``: the fused row of ``tied.width`` columns that begins at
        qk[t, 0, 0] first gets the tied delta (as in :meth:`add_rms_norm`, read from that row,
        in fp32); v is read from the adapted row, and the row's columns past heads · D (the v
        heads of q/k/v) are written back adapted, so the whole fused output is adapted after
        the call. cos and sin are not changed.

        Args:
            qk: [T, heads, D] float32 or bfloat16, heads and dims contiguous (rows may be
                strided: the q and k heads of the fused qkv output). positions: [T] int64.
            cos, sin: [max_len, D] float32 tables from :func:`nlora_serve.engine.model.rope.rope_tables`.
            tied: the tied delta (:meth:`NativeOps.tied_delta`) of the fused output whose rows
                begin at ``qk``'s (q/k/v: the q and k heads, then v), or None. It is added to
                each whole row in fp32 before the rotation, and the rest of the row (v) is
                written back with it, so the fused output is read and written once.
        Returns:
            ``qk``, rotated.
        Raises:
            ValueError: layouts or shapes the op does not take (D a multiple of 32 up to 256), a
                tied delta whose rows are not ``qk``'s. MemoryError: no scratch memory.
        """
        t, heads, d = qk.shape
        ok = (qk.dtype in _DTYPES and qk.stride(2) == 1 and qk.stride(1) == d and d % 32 == 0 and d <= 256
              and positions.dtype == torch.int64 and positions.is_contiguous() and positions.shape == (t,)
              and all(c.dtype == torch.float32 and c.is_contiguous() and c.shape[1] == d for c in (cos, sin)))
        if not ok:
            raise ValueError("rope: qk [T, heads, D] float32/bfloat16 with contiguous heads, D a multiple of 32 "
                             "up to 256, positions [T] int64, cos/sin [max_len, D] float32 contiguous")
        width, addresses, stride = 0, _NO_TIED, qk.stride(0)
        if tied is not None:
            width = tied.width
            if (tied.num_tokens != t or tied.dtype != qk.dtype or width < heads * d
                    or (t > 1 and qk.stride(0) < width)):
                raise ValueError(f"rope: the tied delta is for a [{tied.num_tokens}, {width}] {tied.dtype} output "
                                 f"whose rows begin at qk's; got qk {tuple(qk.shape)} {qk.dtype} strides {qk.stride()}")
            addresses = tied.addresses()
            stride = stride if t > 1 else width  # one row: its stride is arbitrary (a size-1 dim)
        rc = self._fns["nlora_rope"](qk.data_ptr(), t, stride, heads, d, positions.data_ptr(), cos.data_ptr(),
                                     sin.data_ptr(), int(qk.dtype == torch.bfloat16),
                                     _threads(t * heads * d, t, tied is not None), width, *addresses)
        _check_rc("rope", rc)
        return qk

    def silu_mul(self, gate_up: torch.Tensor, tied: TiedDelta | None = None) -> torch.Tensor:
        """``SiLU(gate) · up`` of the fused gate/up output.

        Semantics: out[t, i] = g / (1 + exp(−g)) · u with g = G[t, i], u = G[t, I + i] for
        i < I, where G = gate_up, or gate_up + Δ with ``tied`` (Δ the tied delta of gate_up's
        rows, as in :meth:`add_rms_norm`, kept in fp32); fp32 arithmetic, out rounded once to
        gate_up's dtype. ``gate_up`` is not changed.

        Args:
            gate_up: [T, 2I] float32 or bfloat16 (gate columns first), unit stride in a row.
            tied: gate_up's tied delta (:meth:`NativeOps.tied_delta`), added to it first (read
                once; gate_up itself is not changed), or None.
        Returns:
            [T, I] in ``gate_up``'s dtype.
        Raises:
            ValueError: layouts the op does not take (I a multiple of 16), a tied delta of another
                shape. MemoryError: no scratch memory for the tied delta.
        """
        t, width = gate_up.shape
        inter = width // 2
        if gate_up.dtype not in _DTYPES or not _rows_ok(gate_up) or width % 32:
            raise ValueError("silu_mul: gate_up [T, 2I] float32/bfloat16, unit stride in a row, I a multiple of 16")
        out = torch.empty(t, inter, dtype=gate_up.dtype)
        rc = self._fns["nlora_silu_mul"](gate_up.data_ptr(), t, inter, gate_up.stride(0), out.data_ptr(), inter,
                                         int(gate_up.dtype == torch.bfloat16), _threads(t * inter, t, tied is not None),
                                         *_check_tied("silu_mul", tied, gate_up))
        _check_rc("silu_mul", rc)
        return out
