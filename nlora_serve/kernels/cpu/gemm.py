"""Base GEMMs on the CPU on weights packed once: for our own kernel (``cpu/gemm.c``) where the
native ops are loaded and the CPU runs the dtype fast, else prepacked for oneDNN.

Our kernel (:class:`NativeLinear`) packs W into panels of 48 output columns and keeps an 8 x 48
block of y in registers; on the default model's shapes with cold weights it ran 1.02-1.17x (fp32)
and 1.09-1.49x (bf16) oneDNN's prepacked GEMM at 64 tokens, 1.4-2.0x at 8, even at 2,048
(``bench/cpu_gemm.py``), and in the engine its prefill steps ran as fast as oneDNN's once the
allocator stopped faulting their buffers in (engine/host_memory.py; bench/RESULTS.md), so it
takes every row count.

``F.linear`` on the CPU hands oneDNN (or MKL) the plain ``[out, in]`` weight, which it reorders
into its blocked layout on every call; at decode's small token counts that reorder is a large
part of the call. Reordering once at load, as vLLM-cpu and torch.compile's CPU freezing pass do,
measured 1.2-1.4× (fp32) and 1.6-2.4× (bf16, AVX512-BF16/AMX) on the default model's decode
shapes at 64 tokens, and even at 2,048 (``bench/cpu_gemm.py``; numbers in bench/RESULTS.md).

The plain weight stays where it was: adapters read slices of it (the tied path's W[:, :r]) and
the lm_head is the embedding table. The packed copy (either kind, one per weight) costs one more
copy of the base weights.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# oneDNN picks its blocked layout for this many rows; any row count runs with it (the decode
# batch sizes we serve, 1-256, measured equal between hints 64 and 2048)
BATCH_HINT = 64
# below this many rows float32 stays on F.linear: a single row ran 0.5-0.8x packed (a GEMV, which
# MKL's plain path handles better); bf16 gains at every row count
MIN_ROWS_FP32 = 8


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked here: a CPU float32 or bfloat16 tensor, with oneDNN
    built into torch and, for bfloat16, a CPU that has native bf16 dot products."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class PackedLinear:
    """``y = x @ W.T (+ b)`` with ``W`` reordered once into oneDNN's blocked layout.

    Args:
        weight: ``[out, in]`` float32 or bfloat16 CPU tensor (see :func:`can_prepack`); copied.
        bias: ``[out]`` in the weight's dtype, or None.
    Raises:
        ValueError: a weight :func:`can_prepack` refuses.
    """

    __slots__ = ("weight", "packed", "bias", "min_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if not can_prepack(weight):
            raise ValueError(f"cannot prepack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                             f"{weight.device} for oneDNN (CPU float32/bfloat16 2-D weights only)")
        self.weight = weight  # the plain weight (a reference, not a copy) for the rows F.linear does better
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.to(weight.dtype).contiguous()
        self.min_rows = MIN_ROWS_FP32 if weight.dtype == torch.float32 else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, in] in the weight's dtype -> ``[T, out]`` in the same dtype."""
        if x.shape[0] < self.min_rows:  # also the empty input, which oneDNN refuses
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")



_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(slots=True)
class PackedWeight:
    """A weight ``[N, K]`` in the native GEMM's packed form (:meth:`NativeGemm.pack`)."""

    data: torch.Tensor  # flat, the weight's dtype: nlora_gemm_packed_size(N, K) elements (cpu/gemm.c)
    n: int  # N: output columns
    k: int  # K: input columns, the width x must have


class NativeGemm:
    """The native library's GEMM entry points (``cpu/gemm.c``), loaded with the other native ops
    (:func:`nlora_serve.kernels.cpu.native.load_native`: ``NativeOps.gemm``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.library = str(lib._name)  # the loaded file: what fixes the packed layout (engines share packs by it)
        self._supported = lib.nlora_gemm_supported
        self._supported.restype, self._supported.argtypes = _INT, [_INT]
        self._size = lib.nlora_gemm_packed_size
        self._size.restype, self._size.argtypes = _I64, [_I64, _I64, _INT]
        self._pack = lib.nlora_gemm_pack
        self._pack.restype, self._pack.argtypes = None, [_P, _I64, _I64, _I64, _P, _INT]
        self._gemm = lib.nlora_gemm
        self._gemm.restype, self._gemm.argtypes = _INT, [_P, _I64, _I64, _I64, _P, _I64, _P, _I64, _INT, _INT]
        amx = lib.nlora_amx_init  # 1 where this build has AMX tiles and the kernel grants them
        amx.restype, amx.argtypes = _INT, []
        self._amx = bool(amx())

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether this build runs ``dtype`` fast here (float32: AVX-512; bfloat16: AVX512-BF16,
        and no AMX tiles: there oneDNN's bf16 GEMMs run on the tiles, which ours do not use)."""
        if dtype == torch.bfloat16 and self._amx:
            return False
        return dtype in (torch.float32, torch.bfloat16) and bool(self._supported(int(dtype == torch.bfloat16)))

    def pack(self, weight: torch.Tensor) -> PackedWeight:
        """``weight`` [N, K] (rows may be strided) -> its packed form."""
        n, k = weight.shape
        bf16 = int(weight.dtype == torch.bfloat16)
        packed = torch.empty(self._size(n, k, bf16), dtype=weight.dtype)
        self._pack(weight.data_ptr(), weight.stride(0), n, k, packed.data_ptr(), bf16)
        return PackedWeight(packed, n, k)

    def __call__(self, x: torch.Tensor, packed: PackedWeight, out: torch.Tensor) -> torch.Tensor:
        """``out`` [M, N] = ``x`` [M, K] @ W.T for W's ``packed`` form; rows of x and out may be strided.

        Semantics: out[m, j] = Σ_k x[m, k] · W[j, k] for m < M, j < N, fp32 accumulation
        (cpu/gemm.c): fp32 in and out, or bf16 in and out with out rounded once. Every entry of
        out is overwritten; x and packed are not changed. Split over up to torch.get_num_threads() jobs.

        Args:
            x: [M, K] float32 or bfloat16 CPU tensor, unit column stride, K and dtype the packed W's.
            packed: W [N, K] as :meth:`pack` returns it.
            out: [M, N] of x's dtype, unit column stride, written.

        Returns:
            out.

        Raises:
            ValueError: ``x`` or ``out`` is not a CPU tensor of the packed weight's dtype and width
                with contiguous columns, or a dtype this build cannot run (:meth:`supports`).
        """
        dtype = packed.data.dtype
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != packed.k or x.dtype != dtype or x.stride(1) != 1:
            raise ValueError(f"native GEMM: x must be a CPU [M, {packed.k}] {dtype} tensor with contiguous columns "
                             f"(the packed weight's K and dtype); got {tuple(x.shape)} {x.dtype} on {x.device}")
        m = x.shape[0]
        if out.device.type != "cpu" or out.shape != (m, packed.n) or out.dtype != dtype or out.stride(1) != 1:
            raise ValueError(f"native GEMM: out must be a CPU [{m}, {packed.n}] {dtype} tensor with contiguous "
                             f"columns; got {tuple(out.shape)} {out.dtype} on {out.device}")
        rc = self._gemm(x.data_ptr(), x.stride(0), m, packed.k, packed.data.data_ptr(), packed.n, out.data_ptr(),
                        out.stride(0), int(x.dtype == torch.bfloat16), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"native GEMM: this build cannot run {x.dtype} (NativeGemm.supports)")
        return out


class NativeLinear:
    """``y = x @ W.T (+ b)`` on our kernel (``cpu/gemm.c``), ``W`` packed once into 48-column panels.

    Args:
        weight: ``[out, in]`` float32 or bfloat16 CPU tensor the loaded ``gemm`` supports; packed
            (a copy: the plain weight stays the caller's).
        bias: ``[out]``, or None.
        gemm: the loaded :class:`NativeGemm`.
    Raises:
        ValueError: a weight the kernel cannot take here.
    """

    __slots__ = ("packed", "bias", "out_features", "in_features", "dtype", "gemm")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemm: NativeGemm) -> None:
        if weight.device.type != "cpu" or weight.dim() != 2 or weight.stride(1) != 1 or not gemm.supports(weight.dtype):
            raise ValueError(f"the native GEMM cannot take a {weight.dtype} weight of shape {tuple(weight.shape)} "
                             f"on {weight.device} here")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = gemm.pack(weight)
        self.bias = None if bias is None else bias.to(weight.dtype)
        self.gemm = gemm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, in] in the weight's dtype -> ``[T, out]`` in the same dtype.

        Raises:
            ValueError: x's width or dtype is not the weight's.
        """
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != self.dtype:
            raise ValueError(f"native GEMM: x must be [T, {self.in_features}] {self.dtype}, got {tuple(x.shape)} {x.dtype}")
        if x.stride(1) != 1:  # strided rows are fine, strided columns are copied
            x = x.contiguous()
        y = self.gemm(x, self.packed, torch.empty(x.shape[0], self.out_features, dtype=x.dtype))
        return y if self.bias is None else y.add_(self.bias)  # bf16: rounded, then the bias added and rounded again
