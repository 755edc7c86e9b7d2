"""Launch configurations: cached defaults per op and shape, no autotuning on the serving path.

A per-device JSON file (``configs/<device name>.json``, spaces as underscores, e.g.
``configs/NVIDIA_H200.json``, written after timing on that GPU) may override a default:
``{"<op>": {"<rank width>": {"BLOCK_K": 64, ...}}}``; the launchers look it up by the name of the
CUDA device their tensors are on. `configs/NVIDIA_H200.json` ships the `tied_fused` config that
bench/tune_adapter_kernels.py picked on an H200 (bench/RESULTS.md); other ops and devices use the defaults.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

_CONFIG_DIR = Path(__file__).parent / "configs"

# BLOCK_T ≥ 16 and BLOCK_R ≥ 16 wherever tl.dot runs (the GPU needs M, N, K ≥ 16).
_DEFAULTS = {
    "sgmv_shrink": {"BLOCK_T": 16, "BLOCK_K": 64, "num_warps": 4},
    "bgmv_shrink": {"BLOCK_K": 128, "num_warps": 4},
    "mix": {"BLOCK_T": 8, "num_warps": 4},
    "sgmv_expand": {"BLOCK_T": 16, "BLOCK_N": 64, "num_warps": 4},
    "bgmv_expand": {"BLOCK_N": 128, "num_warps": 4},
    # the tiled tied expand (tied_expand.py): a [16, R] u tile times an [R, 64] W tile per program
    "tied_expand": {"BLOCK_T": 16, "BLOCK_N": 64, "num_warps": 4},
    "tied_expand.fp32": {"BLOCK_T": 16, "BLOCK_N": 64, "num_warps": 4},
    # the grouped (SGMV-style) group path over family-sorted tokens (grouped_shrink/expand.py);
    # PROGRAMS: the grid size the shrink's K splits aim for at decode token counts
    "grouped_shrink": {"BLOCK_T": 16, "BLOCK_K": 128, "PROGRAMS": 256, "num_warps": 4},
    "grouped_shrink.fp32": {"BLOCK_T": 16, "BLOCK_K": 32, "PROGRAMS": 256, "num_warps": 4},
    "grouped_expand": {"BLOCK_T": 16, "BLOCK_N": 64, "num_warps": 4},
    "grouped_expand.fp32": {"BLOCK_T": 16, "BLOCK_N": 64, "num_warps": 8},  # 4 warps: 2 spills on sm_90 (aot.py)
    # PROGRAMS: the grid size the fused tied op aims for (tied_fused.fused_config)
    "tied_fused": {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_N": 64, "PROGRAMS": 512, "num_warps": 4},
    "tied_fused.fp32": {"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_N": 32, "PROGRAMS": 512, "num_warps": 4},
    # attention ops: keyed by head_dim instead of rank (BLOCK_R = the padded head_dim); fp32's
    # "ieee" dots are FMA loops that need smaller tiles or more warps not to spill (aot.py)
    "paged_decode_attention": {"BLOCK_N": 64, "num_warps": 4},
    "paged_decode_attention.fp32": {"BLOCK_N": 64, "num_warps": 8},
    "paged_prefill_attention": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4},
    "paged_prefill_attention.fp32": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4},
}


def block_r(rank: int) -> int:
    """BLOCK_R for rank width ``rank``: a power of two, at least 16 (masked beyond rank)."""
    return max(16, 1 << max(rank - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _device_file(device_name: str) -> dict:
    path = _CONFIG_DIR / f"{device_name.replace(' ', '_')}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def device_config_name(device: torch.device) -> str:
    """The name a device's config file goes by: the CUDA device's name, else ``"default"``."""
    if device.type != "cuda":
        return "default"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_config(op: str, rank: int, device_name: str = "default") -> dict:
    """Launch parameters of ``op`` at rank width ``rank`` on ``device_name``.

    Returns a fresh dict with the op's constexprs (BLOCK_*), ``num_warps`` and ``BLOCK_R``.

    Raises:
        KeyError: unknown op.
    """
    return dict(_config(op, rank, device_name))


@functools.lru_cache(maxsize=None)
def _config(op: str, rank: int, device_name: str) -> dict:
    cfg = dict(_DEFAULTS[op])
    cfg.update(_device_file(device_name).get(op, {}).get(str(rank), {}))
    cfg["BLOCK_R"] = block_r(rank)
    if op == "sgmv_shrink":
        # Chosen by `python -m nlora_serve.kernels.triton_ops.aot` (registers and spills per cubin): the
        # fused mix's fp32 FMA dot spills at R ≥ 64 with four warps or a wider N chunk.
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, 4096 // cfg["BLOCK_R"]))
        cfg["BLOCK_I"] = 16
        if cfg["BLOCK_R"] >= 64:
            cfg["num_warps"] = max(cfg["num_warps"], 8)
    if op == "bgmv_shrink":  # an [R, K] tile of A per step: keep it near 8K elements
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, 8192 // cfg["BLOCK_R"]))
    if op == "bgmv_expand":  # a [BLOCK_N, R] tile of B per program: keep it near 8K elements
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, 8192 // cfg["BLOCK_R"]))
    if op == "mix":  # keep the [BLOCK_T, BLOCK_R, BLOCK_I] product tile near 4K elements
        cfg["BLOCK_T"] = max(1, min(cfg["BLOCK_T"], 4096 // (cfg["BLOCK_R"] ** 2)))
        cfg["BLOCK_I"] = min(cfg["BLOCK_R"], max(16, 4096 // (cfg["BLOCK_T"] * cfg["BLOCK_R"])))
    if op.startswith("grouped_shrink"):  # an [BK, R] A tile and a [BT, BI, R] mix tile: ~8K / 4K elements
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, 8192 // cfg["BLOCK_R"]))
        cfg["BLOCK_I"] = min(cfg["BLOCK_R"], max(1, 4096 // (cfg["BLOCK_T"] * cfg["BLOCK_R"])))
        # aot.py at R = 64: bf16 spilled with four warps on sm_90; fp32 (BLOCK_K 32) spilled with
        # eight on sm_80 and not with four
        if cfg["BLOCK_R"] >= 64 and not op.endswith(".fp32"):
            cfg["num_warps"] = max(cfg["num_warps"], 8)
    if op.startswith("grouped_expand"):  # rank steps of 16: a family stops at its own rank
        cfg["BLOCK_R"] = 16
    if op.startswith("tied_expand"):  # ranks above 128 take K steps of 128 (tied_expand.py)
        cfg["BLOCK_R"] = min(cfg["BLOCK_R"], 128)
        if op.endswith(".fp32") and cfg["BLOCK_R"] >= 64:  # the FMA dot spilled on sm_80 at R = 128 (aot.py)
            cfg["num_warps"] = max(cfg["num_warps"], 8)
    if op.startswith("tied_fused"):  # z, u and an N row: three [BLOCK_T, BLOCK_R] fp32 tiles live
        if cfg["BLOCK_R"] >= 64:
            cfg["num_warps"] = max(cfg["num_warps"], 8)
        if op.endswith(".fp32") and cfg["BLOCK_R"] >= 128:  # FMA dots with K = 128 (aot.py: no spills)
            cfg["BLOCK_K"], cfg["BLOCK_N"] = min(cfg["BLOCK_K"], 16), min(cfg["BLOCK_N"], 16)
    return cfg
