"""Ahead-of-time CUDA compile of every Triton kernel, no GPU needed (DESIGN §4).

The interpreter runs programs one after another on the CPU, so it cannot see what the GPU
compiler rejects (e.g. tl.dot with a dimension under 16); compiling each kernel for sm_80 and
sm_90 here catches that. Run it as ``python -m nlora_serve.kernels.aot`` (not under
TRITON_INTERPRET=1: the kernels must be decorated as compilable JIT functions).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nlora_serve.kernels.bgmv_shrink import _bgmv_shrink_kernel
from nlora_serve.kernels.config import get_config
from nlora_serve.kernels.mix import _mix_kernel
from nlora_serve.kernels.sgmv_expand import _sgmv_expand_kernel
from nlora_serve.kernels.sgmv_shrink import _sgmv_shrink_kernel

_DTYPES = {"fp32": "fp32", "bf16": "bf16"}


@dataclass(frozen=True, slots=True)
class Compiled:
    """One kernel variant's AOT result: sizes in bytes of its PTX and cubin."""

    kernel: str
    capability: int
    dtype: str
    rank: int
    variant: str
    ptx_bytes: int
    cubin_bytes: int


def _signature(fn, dtype: str, out_dtype: str) -> dict:
    """Every argument typed: pointers by role, ints as i32, constexprs marked."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("fam_ptr", "start_ptr", "len_ptr", "slot_ptr"):
            sig[name] = "*i32"
        elif name == "scale_ptr":
            sig[name] = "*fp32"
        elif name in ("out_ptr", "u_ptr"):
            sig[name] = f"*{out_dtype}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def _variants(rank: int):
    """(kernel, op, extra constexprs, variant name) for every specialisation the launchers use."""
    yield _sgmv_shrink_kernel, "sgmv_shrink", {"FUSE_MIX": False}, "shrink"
    yield _sgmv_shrink_kernel, "sgmv_shrink", {"FUSE_MIX": True}, "shrink+mix"
    yield _bgmv_shrink_kernel, "bgmv_shrink", {"FUSE_MIX": False}, "shrink"
    yield _bgmv_shrink_kernel, "bgmv_shrink", {"FUSE_MIX": True}, "shrink+mix"
    yield _mix_kernel, "mix", {"HAS_BIAS": False}, "mix"
    yield _mix_kernel, "mix", {"HAS_BIAS": True}, "mix+bias"
    yield _sgmv_expand_kernel, "sgmv_expand", {"HAS_FAMILY": True}, "family"
    yield _sgmv_expand_kernel, "sgmv_expand", {"HAS_FAMILY": False}, "tied"


def compile_all(capabilities=(80, 90), dtypes=("fp32", "bf16"), ranks=(16,)) -> list[Compiled]:
    """Compile every kernel variant for each (capability, dtype, rank).

    Intermediates (z, u) are fp32, as the launchers allocate them; weights and activations are
    ``dtype``. Raises whatever the Triton compiler raises for a kernel it rejects.
    """
    done = []
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for dtype in dtypes:
            for rank in ranks:
                for fn, op, extra, variant in _variants(rank):
                    cfg = get_config(op, rank)
                    consts = {k: v for k, v in cfg.items() if k in fn.arg_names} | extra
                    src = ASTSource(fn=fn, signature=_signature(fn, _DTYPES[dtype], "fp32"),
                                    constexprs=consts)
                    binary = triton.compile(src, target=target,
                                            options={"num_warps": cfg["num_warps"]})
                    done.append(Compiled(fn.__name__, cap, dtype, rank, variant,
                                         len(binary.asm["ptx"]), len(binary.asm["cubin"])))
    return done


if __name__ == "__main__":
    for c in compile_all(ranks=tuple(int(a) for a in sys.argv[1:]) or (16,)):
        print(f"sm_{c.capability} {c.dtype} r={c.rank} {c.kernel:22s} {c.variant:11s} "
              f"ptx {c.ptx_bytes:7d} B  cubin {c.cubin_bytes:7d} B")
