"""@triton.jit helpers shared by the kernels (tile loads, exact fp32 dots, the paged-attention loop),
and :func:`jit_unaligned`, the decorator of kernels whose pointers' alignment must not key a compile."""

import inspect

import triton
import triton.language as tl


def jit_unaligned(*names: str):
    """``triton.jit`` with ``do_not_specialize_on_alignment=names`` (pointer arguments whose 16-byte
    alignment must not key a compile: scalar loads through views at per-step offsets), or plain
    ``triton.jit`` on a Triton without that argument: 3.1 (PyTorch 2.5's pin, which the ``triton``
    extra allows) has none and refused it, so the kernels' modules did not import; there a kernel
    compiles once per alignment met, as before the argument was used. Read at decoration time."""
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        return triton.jit(do_not_specialize_on_alignment=list(names))
    return triton.jit


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


@triton.jit
def attend_paged_kv(q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, lo, hi, pos, kvh, sk_b, sk_t, sk_h,
                    scale_log2, offs_d, mask_d, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Online softmax (FlashAttention-2's recurrence, in the log2 domain) of the queries q [M, D]
    over one sequence's cached keys and values at positions lo .. hi − 1, BLOCK_N at a time.

    Position p lives in cache block table_row_ptr[p // BLOCK_SIZE], row p % BLOCK_SIZE, KV head
    ``kvh`` (element strides sk_b, sk_t, sk_h; head dim contiguous, offs_d / mask_d its lanes).
    Scores are q·k · scale_log2 (softmax scale × log2 e); with CAUSAL, query row i sees only
    positions ≤ pos[i]. Table entries and cache rows past ``hi`` are never read (masked loads).

    Returns the running (m_i [M] max score, l_i [M] sum of exp2, acc [M, D] unnormalised output),
    fp32, for the caller to divide (acc / l_i) or to merge across splits.
    """
    for k0 in range(lo, hi, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        rows = block.to(tl.int64) * sk_b + (offs_n % BLOCK_SIZE) * sk_t + kvh * sk_h
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=mask_kv, other=0.0)
        s = dot_f32(q, tl.trans(k)) * scale_log2  # [M, N], log2 domain
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc
