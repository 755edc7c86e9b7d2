"""Paged attention over the KV cache, one module per device.

``cpu.py``: torch SDPA over gathered blocks (any device; the CPU's native C decode when loaded).
``cuda.py``: our Triton kernels (decode split over KV blocks, prefill over paged context), which
also run on CPU tensors under ``TRITON_INTERPRET=1``: that is how CI runs the CUDA path.
"""

from __future__ import annotations

import functools

from nlora_serve.engine.model.attention.cpu import paged_attention, write_kv

__all__ = ["paged_attention", "select_attention", "write_kv"]


def select_attention(kernel_backend: str, native=None, max_model_len: int = 2048):
    """``(attention function, decode splits, gather layout)`` of a kernel backend ("native", "torch"
    or "triton"); gather layout: whether the function reads BatchInfo's host-built gather tables.

    ``native`` is the loaded NativeOps (None: torch's decode on the CPU). The Triton modules are
    imported only here, so the CPU engine never imports Triton; the decode split count is fixed
    per engine from ``max_model_len`` (so the decode grid never changes from step to step).
    """
    if kernel_backend == "triton":
        from nlora_serve.engine.model.attention.cuda import paged_attention as triton_attention
        from nlora_serve.kernels.triton_ops.paged_decode_attention import decode_num_splits
        return triton_attention, decode_num_splits(max_model_len), False
    if kernel_backend == "native" and native is not None:
        return functools.partial(paged_attention, native=native), 1, True
    return paged_attention, 1, True
