"""Native CPU ops: the Nyström-tied path of one fused projection (``cpu/tied_apply.c``) and the group
path (plain LoRA / NLoRA / families) of one fused projection (``cpu/group_apply.c``), here; loaded
with them, attention over the paged KV cache (``kernels/cpu/attention.py``), the decoder layer's
elementwise ops (``kernels/cpu/layer_ops.py``) and the base GEMMs (``kernels/cpu/gemm.py``).

Why native: at decode sizes (T ≈ 64, r = 16) the tied path's arithmetic is ~2-3% of the base
GEMMs', but in torch it is five to seven small ops per module, each with a few µs of fixed cost,
and a bf16 oneDNN GEMM with K = 16 pays ~15 µs more (bench/RESULTS.md "Kernels"). One C call per
fused projection (q/k/v, o, gate/up, down) does gather + mix + expand for every tied token in one
pass over y, with the accumulators in registers. The group path likewise: per fused projection
one call does shrink (each A slice loaded once for four tokens of its family), mix and expand for
every group token; torch needs ~15 ops per module for it (bench/RESULTS.md "Kernels").

The C sources are compiled on first use (``kernels/cpu/build.py``). Without a compiler
:func:`load_native` returns None and the engine keeps the torch path; nothing else changes. Loaded
through ctypes, which releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from nlora_serve.kernels.cpu.gemm import NativeGemm
from nlora_serve.kernels.cpu.layer_ops import LayerOps
from nlora_serve.kernels.metadata import AdapterBatch
from nlora_serve.kernels.cpu.attention import PagedAttention
from nlora_serve.kernels.cpu.batch import NativeBatch
from nlora_serve.kernels.cpu.build import build_library
from nlora_serve.kernels.cpu.tied_delta import TiedDelta, TiedPlanArgs, TiedStep, TiedStepArgs
from nlora_serve.kernels.weights import KernelSiteWeights

log = logging.getLogger(__name__)

# the adapter ops split their tokens over torch's threads (OpenMP, cpu/parallel.h) from this
# many; below, one thread (the hand-off costs ~1 µs, a 16-token call tens)
PARALLEL_MIN_ROWS = 16
MAX_RANK = 128  # the C side's static buffers (cpu/adapter_tiles.h MAX_RANK, MAX_MODULES)
MAX_MODULES = 4
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I64, _P, _P, ctypes.c_int, _P, _P, _P, _I64, _I64, ctypes.c_int, _P, _P, ctypes.c_int]
_GROUP_ARGTYPES = [_P, _I64, _P, _I64, _I64, _P, _I64, _P, _P, _P, ctypes.c_int, ctypes.c_int, *[_P] * 14,
                   ctypes.c_int]
_SYMBOLS = {torch.float32: "nlora_tied_apply_f32_mt", torch.bfloat16: "nlora_tied_apply_bf16_mt"}
_GROUP_SYMBOLS = {torch.float32: "nlora_group_apply_f32_mt", torch.bfloat16: "nlora_group_apply_bf16_mt"}


@dataclass(frozen=True, slots=True)
class TiedProjection:
    """One fused projection's tied pools, laid out for the C op (build with :meth:`NativeOps.plan`).

    Holds the tensors it points at, so the pointers stay valid while the plan lives.
    """

    num_modules: int  # modules of the fused output this family adapts (≤ MAX_MODULES)
    rank: int  # R: the pool's rank width
    dtype: torch.dtype  # compute dtype of y and N
    width: int  # Σ widths of the fused output (y's columns)
    keep: tuple  # tensors the pointers below refer to (N views, fp32 B^T copies, biases)
    offsets: ctypes.Array  # [num_modules] int64: first column of each module in y
    widths: ctypes.Array  # [num_modules] int64: columns of each module
    n_ptrs: ctypes.Array  # [num_modules] pointers to slot 0 of each module's N
    n_slot_stride: int  # elements between slots of N (the same for every module)
    n_row_stride: int  # elements between rows of one N
    bt_ptrs: ctypes.Array  # [num_modules] pointers to B^T = W[:, :R]^T, fp32 [R, width] contiguous,
    # or with ``amx`` bf16 packed in pairs (:func:`vnni_pack`)
    bias_ptrs: ctypes.Array  # [num_modules] pointers to bias[:R] (NULL: no bias)
    amx: bool = False  # the expand runs on AMX tiles (cpu/amx.h)
    delta_args: TiedPlanArgs | None = None  # the same for a deferred delta (TiedDelta); None with amx


@dataclass(frozen=True, slots=True)
class GroupProjection:
    """One fused projection's group-path pools (A/B per family), laid out for the C op (build with
    :meth:`NativeOps.plan_group`). Points at the pools themselves (no copy): slot writes made in
    place are seen by the next call; holds the tensors so the pointers stay valid.
    """

    num_modules: int  # modules of the fused output the pool adapts (≤ MAX_MODULES)
    rank: int  # the widest batch rank the pools hold (min over modules of n_pool's R)
    dtype: torch.dtype  # compute dtype of x, y and every pool
    width: int  # Σ widths of the fused output (y's columns)
    dim_in: int  # columns of x (the A pools' last dim)
    keep: tuple  # the pool tensors the pointers below refer to
    offsets: ctypes.Array  # [num_modules] int64: first column of each module in y
    widths: ctypes.Array  # [num_modules] int64: columns of each module
    rank_widths: ctypes.Array  # [num_modules] int64: entries per B row (b_pool's R)
    a_ptrs: ctypes.Array  # [num_modules] pointers to family 0 of each A pool [F, R, in]
    a_strides: tuple  # (family, row) strides of each A pool, two [num_modules] int64 arrays
    n_ptrs: ctypes.Array  # [num_modules] pointers to slot 0 of each N pool [S, R, R]
    n_strides: tuple  # (slot, row) strides of each N pool
    b_ptrs: ctypes.Array  # [num_modules] pointers to family 0 of each B pool [F, out, R]
    b_strides: tuple  # (family, row) strides of each B pool
    bt_ptrs: ctypes.Array | None  # [num_modules] pointers to family 0 of each pool's B^T [F, R, out]
    bt_fam: ctypes.Array | None  # [num_modules] int64: its family strides (None: no B^T kept)
    amx: bool = False  # shrink and expand run on AMX tiles (cpu/group_amx.c)


class NativeOps:
    """The loaded library. :meth:`plan` / :meth:`plan_group` once per projection and pool
    generation, :meth:`tied_apply` / :meth:`group_apply` per step."""

    def __init__(self, lib: ctypes.CDLL, amx: bool = True) -> None:
        self._fns, self._group_fns = {}, {}
        for fns, symbols, argtypes in ((self._fns, _SYMBOLS, _ARGTYPES),
                                       (self._group_fns, _GROUP_SYMBOLS, _GROUP_ARGTYPES)):
            for dtype, name in symbols.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = ctypes.c_int, argtypes
                fns[dtype] = fn
        # AMX tiles for the bf16 expands where the CPU has them and the kernel grants them (cpu/amx.h);
        # ``amx`` False (EngineConfig.cpu_amx; or amx = False before plan()) keeps the AVX-512 path
        self._tied_amx = getattr(lib, "nlora_tied_apply_bf16_amx_mt", None)  # absent: built without AMX
        self._group_amx = getattr(lib, "nlora_group_apply_bf16_amx_mt", None)
        self.amx = (self._tied_amx is not None and amx
                    and bool(lib.nlora_amx_init()))
        if self.amx:
            self._tied_amx.restype, self._tied_amx.argtypes = ctypes.c_int, _ARGTYPES
            self._group_amx.restype, self._group_amx.argtypes = ctypes.c_int, _GROUP_ARGTYPES
        self.attention = PagedAttention(lib)  # decode and prefill over the paged KV cache (kernels/cpu/attention.py)
        self.layer = LayerOps(lib)  # RMSNorm + residual, RoPE, SiLU · up (kernels/cpu/layer_ops.py)
        self.gemm = NativeGemm(lib)  # the base GEMMs on packed weights (kernels/cpu/gemm.py)

    def plan(self, sites: list[KernelSiteWeights | None], widths: list[int]) -> TiedProjection | None:
        """Lay out the tied pools of one fused projection; None when the op cannot serve it.

        Args:
            sites: per module of the fused output, in column order, its pools (None: the family
                does not adapt that module). All must have ``tied_b`` (A/B pools, if any, are the
                group path's: :meth:`plan_group`).
            widths: output columns of each module, same order.
        """
        mods = [(sum(widths[:i]), w, s) for i, (w, s) in enumerate(zip(widths, sites)) if s is not None]
        if not mods or len(mods) > MAX_MODULES or any(s.tied_b is None for *_, s in mods):
            return None
        n0 = mods[0][2].n_pool
        r, dtype = n0.shape[1], n0.dtype
        if dtype not in self._fns or r > MAX_RANK or any(w < r for _, w, _ in mods):
            return None
        if any(s.n_pool.stride() != n0.stride() or s.n_pool.stride(2) != 1 or s.n_pool.dtype != dtype
               for *_, s in mods):
            return None
        amx = self.amx and dtype == torch.bfloat16
        bts = [s.tied_b[:, :r].t().float().contiguous() for *_, s in mods]  # [R, w] fp32
        if amx:
            bts = [vnni_pack(bt.to(dtype)) for bt in bts]
        biases = [s.tied_bias[:r].contiguous() if s.tied_bias is not None else None for *_, s in mods]
        keep = (*[s.n_pool for *_, s in mods], *bts, *[b for b in biases if b is not None])
        offsets, mod_widths = _array(_I64, [o for o, _, _ in mods]), _array(_I64, [w for _, w, _ in mods])
        n_ptrs, bt_ptrs = _array(_P, [s.n_pool.data_ptr() for *_, s in mods]), _array(_P, [b.data_ptr() for b in bts])
        bias_ptrs = _array(_P, [b.data_ptr() if b is not None else None for b in biases])
        addr = ctypes.addressof
        delta_args = None if amx else TiedPlanArgs(
            len(mods), r, int(dtype == torch.bfloat16), addr(offsets), addr(mod_widths), addr(n_ptrs),
            addr(bias_ptrs), n0.stride(0), n0.stride(1), addr(bt_ptrs))
        return TiedProjection(
            num_modules=len(mods), rank=r, dtype=dtype, width=sum(widths), keep=keep, offsets=offsets,
            widths=mod_widths, n_ptrs=n_ptrs, n_slot_stride=n0.stride(0), n_row_stride=n0.stride(1), bt_ptrs=bt_ptrs,
            bias_ptrs=bias_ptrs, amx=amx, delta_args=delta_args)

    def plan_group(self, sites: list[KernelSiteWeights | None], widths: list[int]) -> GroupProjection | None:
        """Lay out the group-path pools of one fused projection; None when the op cannot serve it.

        Args:
            sites: per module of the fused output, in column order, its pools (None: not adapted
                there). Every one must have A/B pools (``a_pool`` [F, R, in], ``b_pool``
                [F, out, R], ``n_pool`` [S, R, R]) on the CPU, one dtype (fp32 or bf16), the
                same ``in``, unit stride along the last dim, R ≤ MAX_RANK.
            widths: output columns of each module, same order.
        """
        mods = [(sum(widths[:i]), w, s) for i, (w, s) in enumerate(zip(widths, sites)) if s is not None]
        if not mods or len(mods) > MAX_MODULES or any(s.a_pool is None for *_, s in mods):
            return None
        a0 = mods[0][2].a_pool
        dtype, dim_in = a0.dtype, a0.shape[2]
        for _, w, s in mods:
            pools = (s.a_pool, s.b_pool, s.n_pool)
            if (any(p.dtype != dtype or p.is_cuda or p.stride(2) != 1 for p in pools) or dtype not in self._group_fns
                    or s.a_pool.shape[2] != dim_in or s.b_pool.shape[1] != w or s.n_pool.shape[1] > MAX_RANK):
                return None
        # the pools' own B^T when every module has one with rows `width` apart (the C side's layout)
        pool_bt = all(s.b_pool_t is not None and s.b_pool_t.dtype == dtype
                      and (s.b_pool_t.stride(1) == w or s.b_pool_t.shape[1] == 1) for _, w, s in mods)
        # AMX (cpu/group_amx.c): bf16 with the pools' B^T, dim_in in whole 32-entry tiles, A rows in
        # whole 16-row tiles
        amx = (self.amx and dtype == torch.bfloat16 and pool_bt and dim_in % 32 == 0
               and all(s.a_pool.shape[1] % 16 == 0 and s.b_pool.shape[2] % 16 == 0 for *_, s in mods))
        i64 = lambda f: _array(_I64, [f(s) for *_, s in mods])  # noqa: E731
        ptrs = lambda f: _array(_P, [f(s).data_ptr() for *_, s in mods])  # noqa: E731
        return GroupProjection(
            num_modules=len(mods), rank=min(s.rank_width for *_, s in mods), dtype=dtype, width=sum(widths),
            dim_in=dim_in, keep=tuple(p for *_, s in mods for p in (s.a_pool, s.b_pool, s.n_pool, s.b_pool_t)
                                      if p is not None),
            offsets=_array(_I64, [o for o, _, _ in mods]), widths=_array(_I64, [w for _, w, _ in mods]),
            rank_widths=i64(lambda s: s.b_pool.shape[2]),
            a_ptrs=ptrs(lambda s: s.a_pool), a_strides=(i64(lambda s: s.a_pool.stride(0)),
                                                        i64(lambda s: s.a_pool.stride(1))),
            n_ptrs=ptrs(lambda s: s.n_pool), n_strides=(i64(lambda s: s.n_pool.stride(0)),
                                                        i64(lambda s: s.n_pool.stride(1))),
            b_ptrs=ptrs(lambda s: s.b_pool), b_strides=(i64(lambda s: s.b_pool.stride(0)),
                                                        i64(lambda s: s.b_pool.stride(1))),
            bt_ptrs=ptrs(lambda s: s.b_pool_t) if pool_bt else None,
            bt_fam=i64(lambda s: s.b_pool_t.stride(0)) if pool_bt else None, amx=amx)

    def group_apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch | NativeBatch,
                    plan: GroupProjection) -> torch.Tensor:
        """Add every group token's delta into the fused output ``y`` in place.

        Semantics: for each token t with slot s = batch.tok_group_slot[t] ≥ 0, family
        f = batch.tok_group_family[t], r = batch.max_rank, and each module m of the plan:
        y[t, m] += scaling[s] · B_m[f][:, :r] · N_m[s][:r, :r] · A_m[f][:r] · x[t]; every other row
        and column (slot −1 and tied tokens, modules without a site) is untouched; nothing of an
        unused slot or family is read. fp32 arithmetic throughout (bf16 y rounded once).

        Args:
            y: [T, width] CPU tensor, plan.dtype, unit column stride (rows may be strided, e.g. a
                fused output's column slice).
            x: [T, dim_in] the projection's input, plan.dtype, unit column stride.
            batch: the step's metadata (``group_index``, ``tok_group_slot``, ``tok_group_family``,
                ``slot_scalings`` on the CPU).
            plan: this projection's :class:`GroupProjection`.

        Raises:
            ValueError: y's or x's shape, dtype, device or layout does not match the plan or the
                batch, or the batch's rank exceeds the pools'. MemoryError: no scratch memory.
        """
        num_tokens = batch.num_tokens
        for name, t, cols in (("y", y, plan.width), ("x", x, plan.dim_in)):
            if t.dim() != 2 or t.shape != (num_tokens, cols) or t.dtype != plan.dtype or t.is_cuda or t.stride(1) != 1:
                raise ValueError(f"{name} must be a CPU [T={num_tokens}, {cols}] {plan.dtype} tensor with unit "
                                 f"column stride; got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
        if batch.max_rank > plan.rank:
            raise ValueError(f"batch rank {batch.max_rank} exceeds the pools' width {plan.rank}")
        if not batch.num_group:
            return y
        index = batch.group_index.contiguous()
        slots, fams = batch.tok_group_slot.contiguous(), batch.tok_group_family.contiguous()
        scalings = batch.slot_scalings.contiguous()

        rc = (self._group_amx if plan.amx else self._group_fns[plan.dtype])(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), plan.dim_in, index.data_ptr(), index.numel(),
            slots.data_ptr(), fams.data_ptr(), scalings.data_ptr(), batch.max_rank, plan.num_modules, plan.offsets,
            plan.widths, plan.rank_widths, plan.a_ptrs, *plan.a_strides, plan.n_ptrs, *plan.n_strides, plan.b_ptrs,
            *plan.b_strides, plan.bt_ptrs, plan.bt_fam, _threads(index.numel()))
        if rc == -2:
            raise MemoryError("native group op: no memory for its scratch buffers")
        if rc != 0:  # plan_group() admits only what the C side's buffers hold
            raise ValueError(f"native group op refused rank {batch.max_rank} / {plan.num_modules} modules")
        return y

    def tied_apply(self, y: torch.Tensor, batch: AdapterBatch | NativeBatch, plan: TiedProjection) -> torch.Tensor:
        """Add every tied token's delta into the fused output ``y`` in place.

        Semantics: for each token t with s = batch.tok_tied_slot[t] ≥ 0 and each module m of the
        plan: y[t, m] += scaling[s] · B_m · N_m[s] · (y[t, m][:r] − bias_m[:r]), z read before
        any add; every other row and column is untouched. The delta is computed in fp32.

        Args:
            y: [T, width] CPU tensor, plan.dtype, unit column stride (rows may be strided).
            batch: the step's metadata (``tok_tied_slot``, ``slot_scalings`` on the CPU).
            plan: this projection's :class:`TiedProjection`.

        Raises:
            ValueError: y's shape, dtype, device or layout does not match the plan or the batch.
        """
        if (y.dim() != 2 or y.shape != (batch.num_tokens, plan.width) or y.dtype != plan.dtype
                or y.is_cuda or y.stride(1) != 1):
            raise ValueError(f"y must be a CPU [T={batch.num_tokens}, {plan.width}] {plan.dtype} tensor with "
                             f"unit column stride; got {tuple(y.shape)} {y.dtype} strides {y.stride()}")
        slots, scalings = batch.tok_tied_slot.contiguous(), batch.slot_scalings.contiguous()
        rc = (self._tied_amx if plan.amx else self._fns[plan.dtype])(
            y.data_ptr(), y.shape[0], y.stride(0), slots.data_ptr(), scalings.data_ptr(), plan.num_modules,
            plan.offsets, plan.widths, plan.n_ptrs, plan.n_slot_stride, plan.n_row_stride, plan.rank, plan.bt_ptrs,
            plan.bias_ptrs, _threads(y.shape[0]))
        if rc != 0:  # plan() admits only what the C side's buffers hold
            raise ValueError(f"native tied op refused rank {plan.rank} / {plan.num_modules} modules")
        return y

    def tied_step(self, batch: AdapterBatch | NativeBatch) -> TiedStep:
        """``batch``'s tied tokens, for :meth:`tied_delta` (build once per step and pool)."""
        slots, scalings = batch.tok_tied_slot.contiguous(), batch.slot_scalings.contiguous()
        args = TiedStepArgs(slots.data_ptr(), scalings.data_ptr())
        return TiedStep(args, ctypes.addressof(args), batch.num_tokens, (slots, scalings))

    def tied_delta(self, step: TiedStep, plan: TiedProjection) -> TiedDelta | None:
        """The tied delta of ``plan``'s projection for ``step``'s tied tokens (:meth:`tied_step`),
        with :meth:`tied_apply`'s semantics, to be added by the op that consumes the projection's
        output (:class:`TiedDelta`); None when that op cannot take it (an AMX plan's packed B^T:
        call :meth:`tied_apply` instead).

        Semantics: no arithmetic and no write here. The returned handle stands for
        Δ [step.num_tokens, plan.width]: Δ[t, m] = scaling[s] · B_m · N_m[s] · (y[t, m][:r] −
        bias_m[:r]) for each token t with s = tok_tied_slot[t] ≥ 0 and each module m of the plan,
        0 in every other row and column, where y is the projection's output as the base GEMM
        wrote it. The :class:`~nlora_serve.kernels.cpu.layer_ops.LayerOps` op given it as ``tied``
        (``rope``, ``add_rms_norm``, ``add``, ``silu_mul``) reads y + Δ, computing Δ in fp32 on
        an fp32 copy of each row chunk (cpu/tied_delta.h).

        Args:
            step: from :meth:`tied_step` on the step's batch: tok_tied_slot [T] int32 and
                slot_scalings [S] float32 on the CPU, held by the step.
            plan: this projection's :class:`TiedProjection` (N pools [S, R, R] fp32 or bf16,
                B^T [R, width_m] fp32 per module); the handle holds it.

        Returns:
            A :class:`TiedDelta`, valid while ``step`` and ``plan`` are (the step's forward), or
            None for an AMX plan.
        """
        return None if plan.delta_args is None else TiedDelta(plan, step)


def vnni_pack(bt: torch.Tensor) -> torch.Tensor:
    """B^T laid out for an AMX tile product (cpu/amx.h ``amx_expand_bf16``).

    Args:
        bt: [r, w] bf16, B^T.

    Returns:
        [rp / 2, wp, 2] bf16 contiguous, rp = r rounded up to 16 and wp = w rounded up to 16:
        out[k // 2, j, k % 2] = bt[k, j], zero outside bt (the "VNNI" pair layout: two
        consecutive k of one column side by side, as TDPBF16PS reads its second operand).
    """
    r, w = bt.shape
    padded = torch.zeros(-(-r // 16) * 16, -(-w // 16) * 16, dtype=bt.dtype)
    padded[:r, :w] = bt
    return padded.view(padded.shape[0] // 2, 2, padded.shape[1]).transpose(1, 2).contiguous()


def _threads(rows: int) -> int:
    """Threads an adapter op over ``rows`` independent tokens runs on: torch's count from
    :data:`PARALLEL_MIN_ROWS` rows, else one."""
    return torch.get_num_threads() if rows >= PARALLEL_MIN_ROWS else 1


def _array(ctype, values: list):
    return (ctype * len(values))(*values)


def load_native(build_dir: Path, amx: bool = True) -> NativeOps | None:
    """Compile (once) and load the native CPU op; None, with one warning, when that fails.

    Args:
        build_dir: folder for the compiled library (created if missing), e.g. ``<cache>/kernels``.
        amx: bf16 adapter products on AMX tiles where the CPU has them (False: AVX-512).
    """
    try:
        return NativeOps(ctypes.CDLL(str(build_library(Path(build_dir)))), amx)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("native CPU adapter op unavailable (%s); using the torch path", exc)
        return None
