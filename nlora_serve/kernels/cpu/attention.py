"""Attention over the paged KV cache on the CPU: decode tokens (``cpu/paged_attention.c``) and
prefill chunks (``cpu/paged_prefill.c``), loaded with the other native ops
(:func:`nlora_serve.kernels.cpu.native.load_native`; ``NativeOps.attention``).

Why native: torch's CPU path must gather every sequence's blocks into a dense [N, L, KVH, D] copy
per layer before SDPA; these ops read each key and value row once, in place, for all query heads
of its kv head (decode), or stream them through flash attention's online softmax in tiles of 32
query tokens (prefill). The torch path (``engine/model/attention/cpu.py``) stays the reference
(``tests/kernels/test_native.py``, ``tests/kernels/test_paged_prefill.py``).
"""

from __future__ import annotations

import ctypes

import torch

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_DECODE_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _P, _I64, _INT, _INT, _INT, _INT, _F, _P, _I64, _INT, _INT]
_PREFILL_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _INT, _INT, _INT, _INT, _F, _P, _I64, _INT, _INT]
_WRITE_ARGTYPES = [_P, _P, _I64, _P, _I64, _P, _I64, _P, _I64, _I64]
_DTYPES = (torch.float32, torch.bfloat16)


class PagedAttention:
    """The library's paged attention entry points and the KV write, with their layouts checked."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._decode = lib.nlora_paged_decode
        self._decode.restype, self._decode.argtypes = ctypes.c_int, _DECODE_ARGTYPES
        self._prefill = lib.nlora_paged_prefill
        self._prefill.restype, self._prefill.argtypes = ctypes.c_int, _PREFILL_ARGTYPES
        self._write = lib.nlora_write_kv
        self._write.restype, self._write.argtypes = ctypes.c_int, _WRITE_ARGTYPES

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """This step's keys and values into the cache: ``kv_layer[0].view(-1, KVH, D)[slot_mapping[t]]
        = k[t]``, and the same for v in ``kv_layer[1]`` (what ``engine/model/attention/cpu.write_kv`` does
        with two ``index_copy_``; one C loop of row copies here).

        Semantics: with K = kv_layer[0] and V = kv_layer[1] viewed as [NB · BS, KVH, D], for
        t = 0 .. T − 1 in order: K[slot_mapping[t]] = k[t] and V[slot_mapping[t]] = v[t], byte
        copies (no dtype change; a slot named twice keeps the last t's row). kv_layer is changed
        in place at those slots only; every slot is checked before the first copy. k, v and
        slot_mapping are not changed.

        Args:
            kv_layer: [2, NB, BS, KVH, D] contiguous, fp32 or bf16. k, v: [T, KVH, D] in its dtype,
                rows may be strided, heads and dims contiguous. slot_mapping: [T] int64 contiguous,
                flat slots (block · BS + offset).

        Raises:
            ValueError: a layout or dtype the op does not take, or a slot outside [0, NB · BS)
                (then nothing is written).
        """
        num_kv_heads, head_dim = kv_layer.shape[3:]
        t = slot_mapping.shape[0]
        ok = (kv_layer.dtype in _DTYPES and k.dtype == v.dtype == kv_layer.dtype and kv_layer.is_contiguous()
              and k.shape == v.shape == (t, num_kv_heads, head_dim) and k.stride(2) == v.stride(2) == 1
              and k.stride(1) == v.stride(1) == head_dim and slot_mapping.dtype == torch.int64
              and slot_mapping.is_contiguous() and slot_mapping.dim() == 1)
        if not ok:
            raise ValueError("write_kv: kv_layer [2, NB, BS, KVH, D] contiguous, k and v [T, KVH, D] of its dtype "
                             "(contiguous heads), slot_mapping [T] int64 contiguous")
        elem = kv_layer.element_size()
        rc = self._write(kv_layer[0].data_ptr(), kv_layer[1].data_ptr(), kv_layer.shape[1] * kv_layer.shape[2],
                         k.data_ptr(), k.stride(0) * elem, v.data_ptr(), v.stride(0) * elem, slot_mapping.data_ptr(),
                         t, num_kv_heads * head_dim * elem)
        if rc != 0:
            raise ValueError(f"write_kv: a slot of slot_mapping is outside [0, {kv_layer.shape[1] * kv_layer.shape[2]})")

    def decode(self, q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """Attention of N decode tokens over their sequences' cached keys and values, in place.

        Semantics: out[n, i] = Σ_p softmax_p(scale · q[n, i]·K[n, i // G, p]) · V[n, i // G, p]
        over the first context_lens[n] positions, position p in block block_tables[n, p // BS]
        at offset p % BS; G = H / KVH (grouped-query attention as in HF Llama). Arithmetic in fp32.

        Args:
            q: [N, H, D] queries (RoPE applied), fp32 or bf16, rows may be strided, heads and
                dims contiguous. kv_layer: [2, NB, BS, KVH, D] contiguous, q's dtype (this step's
                K/V already written). block_tables: [N, B] int64. context_lens: [N] int64, each
                ≥ 1 and ≤ B · BS. scale: softmax scale. out: [N, H, D] like q, written.
            num_threads: POSIX threads the sequences are split over.

        Raises:
            ValueError: a layout, dtype or head shape the op does not take (D a multiple of 16
                up to 256, H / KVH ≤ 16).
        """
        n, num_heads, head_dim = q.shape
        num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
        ok = (q.dtype in _DTYPES and kv_layer.dtype == q.dtype == out.dtype and kv_layer.is_contiguous()
              and q.stride(2) == 1 and q.stride(1) == head_dim and out.is_contiguous() and out.shape == q.shape
              and block_tables.dtype == context_lens.dtype == torch.int64 and block_tables.is_contiguous()
              and context_lens.is_contiguous() and block_tables.shape[0] == context_lens.shape[0] == n)
        if not ok:
            raise ValueError("paged_decode: q [N, H, D] (contiguous heads), kv_layer [2, NB, BS, KVH, D] "
                             "contiguous, out like q, int64 contiguous block_tables [N, B] and context_lens [N]")
        rc = self._decode(q.data_ptr(), q.stride(0), kv_layer[0].data_ptr(), kv_layer[1].data_ptr(),
                          block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(), n, num_heads,
                          num_kv_heads, head_dim, block_size, scale, out.data_ptr(), out.stride(0),
                          int(q.dtype == torch.bfloat16), num_threads)
        if rc == -1:
            raise ValueError(f"paged_decode: head_dim {head_dim} must be a multiple of 16 up to 256 and "
                             f"num_heads / num_kv_heads ({num_heads}/{num_kv_heads}) at most 16")
        if rc != 0:
            raise MemoryError("paged_decode: no memory or thread for the score buffers")
        return out

    def prefill(self, q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                      query_starts: torch.Tensor, context_lens: torch.Tensor, scale: float, out: torch.Tensor,
                      num_threads: int = 1) -> torch.Tensor:
        """Causal attention of P prefill chunks over their sequences' cached keys and values, in place.

        Semantics: chunk c owns the query rows query_starts[c] .. query_starts[c + 1] - 1 of
        ``q`` and ``out``; its q_len tokens sit at positions context_lens[c] - q_len onwards (after
        any cached prefix), and token r attends to every position up to its own:
        out[t, i] = Σ_{p ≤ pos} softmax_p(scale · q[t, i]·K[c, i // G, p]) · V[c, i // G, p],
        position p in block block_tables[c, p // BS] at offset p % BS; G = H / KVH (grouped-query
        attention as in HF Llama). Flash attention's online softmax, arithmetic in fp32.

        Args:
            q: [T, H, D] queries (RoPE applied), fp32 or bf16, rows may be strided, heads and
                dims contiguous. kv_layer: [2, NB, BS, KVH, D] contiguous, q's dtype (this step's
                K/V already written). block_tables: [P, W] int32, rows contiguous.
                query_starts: [P + 1] int64 contiguous, non-decreasing row offsets into q.
                context_lens: [P] int64, each ≥ its chunk's q_len and ≤ W · BS. scale: softmax
                scale. out: [T, H, D] contiguous like q; rows outside the chunks are untouched.
            num_threads: jobs the (chunk, kv head, 32-token tile) items are shared by.

        Raises:
            ValueError: a layout, dtype or head shape the op does not take (D a multiple of 16
                up to 256, H / KVH ≤ 16), or a chunk longer than its context.
        """
        num_heads, head_dim = q.shape[1:]
        num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
        p = context_lens.shape[0]
        ok = (q.dtype in _DTYPES and kv_layer.dtype == q.dtype == out.dtype and kv_layer.is_contiguous()
              and q.stride(2) == 1 and q.stride(1) == head_dim and out.is_contiguous() and out.shape == q.shape
              and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 and block_tables.shape[0] == p
              and query_starts.dtype == context_lens.dtype == torch.int64 and query_starts.is_contiguous()
              and context_lens.is_contiguous() and query_starts.shape[0] == p + 1)
        if not ok:
            raise ValueError("paged_prefill: q [T, H, D] (contiguous heads), kv_layer [2, NB, BS, KVH, D] "
                             "contiguous, out like q, int32 block_tables [P, W] with contiguous rows, int64 "
                             "contiguous query_starts [P + 1] and context_lens [P]")
        rc = self._prefill(q.data_ptr(), q.stride(0), kv_layer[0].data_ptr(), kv_layer[1].data_ptr(),
                           block_tables.data_ptr(), block_tables.stride(0), query_starts.data_ptr(),
                           context_lens.data_ptr(), p, num_heads, num_kv_heads, head_dim, block_size, scale,
                           out.data_ptr(), out.stride(0), int(q.dtype == torch.bfloat16), num_threads)
        if rc == -1:
            raise ValueError(f"paged_prefill: head_dim {head_dim} must be a multiple of 16 up to 256, "
                             f"num_heads / num_kv_heads ({num_heads}/{num_kv_heads}) at most 16, and no chunk "
                             "longer than its context")
        if rc != 0:
            raise MemoryError("paged_prefill: no memory or thread for the staging buffers")
        return out
