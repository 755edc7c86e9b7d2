"""Offline launch-config tuning for the fused tied op; writes the per-device config file the
launchers read (nlora_serve/kernels/triton_ops/config.py: ``configs/<device name>.json``).

    python bench/tune_adapter_kernels.py [--shape llama-8b] [--tokens 64 256] [--out FILE]

For each candidate config of ``tied_fused`` (block sizes, warps, programs in flight) the layer of
bench/adapter_kernels.py runs with 64 tied tenants at each token count, base GEMMs + adapter in one
CUDA graph, timed by replay in interleaved rounds (median kept); the candidate with the least total
adapter time over the token counts wins and is merged into the device file under
``{"tied_fused": {"16": {...}}}`` (other ops' entries kept). r = 16 (the bench's rank) only: the
file is keyed by rank width. Without CUDA it runs at a tiny shape under the Triton interpreter
(tests only; the times mean nothing) and needs ``--out``. H200 estimate: ~7 compiles + 2 token
counts × 9 runs × 7 rounds of 10 ms ≈ 30 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import adapter_kernels as ak  # noqa: E402  (sets the interpreter flag first when there is no GPU)

CONFIG_DIR = Path(__file__).parents[1] / "nlora_serve" / "kernels" / "triton_ops" / "configs"
# Candidates around the default (BLOCK_T 16, BLOCK_K 64, BLOCK_N 64, PROGRAMS 512, 4 warps)
CANDIDATES = [
    {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_N": 64, "PROGRAMS": 512, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_N": 64, "PROGRAMS": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_K": 128, "BLOCK_N": 64, "PROGRAMS": 256, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_K": 256, "BLOCK_N": 64, "PROGRAMS": 128, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_K": 64, "BLOCK_N": 128, "PROGRAMS": 512, "num_warps": 4},
    {"BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_N": 64, "PROGRAMS": 512, "num_warps": 4},
    {"BLOCK_T": 16, "BLOCK_K": 128, "BLOCK_N": 128, "PROGRAMS": 1024, "num_warps": 8},
    {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_N": 128, "PROGRAMS": 512, "num_warps": 8},
]


def tune(shape: str, tokens: list[int], dtype: str, device: str, rounds: int, sample_s: float,
         candidates: list[dict] = CANDIDATES) -> tuple[dict, list]:
    """(best candidate, [(candidate, adapter seconds per token count)]) by total adapter time."""
    paths = {f"c{i}": ("tied", "fused", cand) for i, cand in enumerate(candidates)}
    totals = {name: [] for name in paths}
    for num_tokens in tokens:
        t = ak.bench_one(shape, dtype, num_tokens, device, rounds, sample_s, paths)
        for name in paths:
            totals[name].append(t[name] - t["base"])
        if device == "cuda":
            torch.cuda.empty_cache()
    table = [(candidates[int(name[1:])], times) for name, times in totals.items()]
    best = min(table, key=lambda row: sum(row[1]))[0]
    return best, table


def write_config(path: Path, best: dict, op: str, rank: int = ak.RANK) -> dict:
    """Merge ``best`` into the device file at ``path`` under <op>/<rank>; returns the file's dict."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(op, {})[str(rank)] = best
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, choices=[*ak.SHAPE_DIRS, "tiny"])
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--candidates", type=int, default=len(CANDIDATES), help="try the first N only")
    parser.add_argument("--out", type=Path, default=None, help="default: configs/<CUDA device name>.json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.out is None:
        parser.error("without CUDA, --out is required (interpreter times are not a device's config)")
    out = args.out or CONFIG_DIR / f"{torch.cuda.get_device_name().replace(' ', '_')}.json"
    shape = args.shape or ("llama-8b" if device == "cuda" else "tiny")
    tokens = args.tokens or ([64, 256] if device == "cuda" else [4])
    dtype = "bf16" if device == "cuda" else "fp32"
    best, table = tune(shape, tokens, dtype, device, args.rounds, args.sample_ms / 1e3,
                       CANDIDATES[:args.candidates])
    for cand, times in table:
        mark = " <- best" if cand is best else ""
        print(f"{json.dumps(cand):90} " + " ".join(f"{t * 1e6:8.1f}" for t in times) + f" us{mark}")
    op = "tied_fused.fp32" if dtype == "fp32" else "tied_fused"  # the launcher's key per dtype
    data = write_config(out, best, op)
    print(f"tokens {tokens}, {shape}, {dtype}: wrote {op} r={ak.RANK} to {out}")
    return data


if __name__ == "__main__":
    main()
