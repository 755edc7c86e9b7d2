"""Argument checks shared by the Triton launchers (plain Python, run before every launch)."""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)
INT32_ELEMENTS = 2 ** 31  # element offsets the adapter kernels compute as token * row stride in int32


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise TypeError unless ``t`` has the compute dtype ``dtype`` (fp32, bf16 or fp16)."""
    if t.dtype not in _FLOATS or t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (one of fp32/bf16/fp16 for every operand), "
                        f"got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    """Raise TypeError/ValueError unless ``t`` is a contiguous 1-D int32/int64 index tensor."""
    if t.dtype not in _INTS:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")


def check_rows(name: str, t: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless ``t`` is 2-D with ``num_tokens`` rows."""
    if t.dim() != 2 or t.shape[0] != num_tokens:
        raise ValueError(f"{name} must be [{num_tokens}, ...], got {tuple(t.shape)}")


def check_token_offsets(num_tokens: int, spec) -> None:
    """Raise ValueError unless every [tokens, columns] operand of the Triton adapter kernels at
    ``num_tokens`` tokens (the step budget) is indexable in int32.

    The bgmv / sgmv / tied kernels address a token's row as ``token * row stride`` in int32 (the
    grouped ones widen to int64); the widest rows are a fused q/k/v or gate/up output and the
    down projection's input. Past 2^31 elements the offsets wrap and the kernels read and write
    other rows, silently. ``spec``: the model's :class:`~nlora_serve.models.spec.ModelSpec`.
    """
    shapes = {m: spec.projection_shape(m) for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}
    widest = max(sum(shapes[m][0] for m in ("q_proj", "k_proj", "v_proj")),
                 shapes["gate_proj"][0] + shapes["up_proj"][0], max(inp for _, inp in shapes.values()))
    if num_tokens * widest >= INT32_ELEMENTS:
        raise ValueError(f"{num_tokens} tokens per step x {widest} columns is past the Triton adapter kernels' "
                         f"int32 row offsets (2^31 elements); lower --max-num-batched-tokens to at most "
                         f"{(INT32_ELEMENTS - 1) // widest}")


def check_paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          out: torch.Tensor, rows: str) -> None:
    """The checks both paged attention launchers share: ``q`` and ``out`` [rows, H, D] with
    contiguous dims in one float dtype, ``kv_layer`` contiguous [2, NB, BS, KVH, D] with H a
    multiple of KVH, ``block_tables`` int32/int64 2-D with contiguous rows.

    Raises:
        TypeError: a dtype is off. ValueError: a shape or layout is off (named in the message).
    """
    check_float("kv_layer", kv_layer, q.dtype)
    check_float("out", out, q.dtype)
    if block_tables.dtype not in _INTS:
        raise TypeError(f"block_tables must be int32 or int64, got {block_tables.dtype}")
    if q.dim() != 3 or out.shape != q.shape or q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"q and out must be [{rows}, H, D] with contiguous dims, got q {tuple(q.shape)}, "
                         f"out {tuple(out.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2 or kv_layer.shape[4] != head_dim \
            or not kv_layer.is_contiguous():
        raise ValueError(f"kv_layer must be contiguous [2, NB, BS, KVH, {head_dim}], got "
                         f"{tuple(kv_layer.shape)}")
    if num_heads % kv_layer.shape[3]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv_layer.shape[3]} KV heads")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be 2-D with contiguous rows, got {tuple(block_tables.shape)}")


def attention_op_name(op: str, dtype: torch.dtype) -> str:
    """Config key of an attention op: fp32 has its own tiles (its dots are FMA loops, not tensor-core ones)."""
    return op + (".fp32" if dtype == torch.float32 else "")
