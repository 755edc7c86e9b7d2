"""@triton.jit helpers shared by the kernels (tile loads and exact fp32 dots)."""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, offs_m, offs_n, stride_m, stride_n, mask_m, mask_n):
    """Load a [M, N] tile at ptr + m·stride_m + n·stride_n; masked entries read as 0."""
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
                   mask=mask_m[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def store_tile(ptr, val, offs_m, offs_n, stride_m, stride_n, mask_m, mask_n):
    """Store a [M, N] tile (cast to the pointer's element type) under the same addressing."""
    tl.store(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
             val.to(ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def dot_f32(a, b):
    """a @ b accumulated in fp32. Any fp32 operand makes it an fp32 "ieee" dot (DESIGN §4: tf32
    would miss 1e-5); two bf16/fp16 operands stay narrow so the tensor cores do the work."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b.to(tl.float32), input_precision="ieee")
    elif b.dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b, input_precision="ieee")
    else:
        out = tl.dot(a, b, out_dtype=tl.float32)
    return out
