"""CPU GEMMs per shape: torch's ``F.linear`` against the same weight prepacked once for oneDNN.

Issue 22: the engine's base GEMMs on the CPU. For each projection of the model (q/k/v fused,
o, gate/up fused, down, the lm_head) and each token count M, both ways are timed side by side in
one run, interleaved, best of ``--repeats`` (the box is shared: the best is the least disturbed),
and the ratio printed. Prepacking reorders W into oneDNN's blocked layout once at load, so no call
repacks it (``F.linear`` lets oneDNN / MKL repack or stream the plain layout on every call).

    .venv/bin/python bench/cpu_gemm.py                       # default model's shapes, fp32 and bf16
    .venv/bin/python bench/cpu_gemm.py --m 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora_serve.kernels.cpu_gemm import PackedLinear

# (name, out, in) of SmolLM2-135M: hidden 576, 9 q / 3 kv heads of 64, intermediate 1536, vocab 49152
SHAPES = [("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down_proj", 576, 1536),
          ("lm_head", 49152, 576)]


def best_seconds(fn, calls: int, repeats: int) -> float:
    """Best mean seconds per call of ``fn`` over ``repeats`` runs of ``calls`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(out: int, inp: int, m: int, dtype: torch.dtype, repeats: int) -> dict:
    """F.linear vs PackedLinear for one shape; their outputs are compared against float64 too."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out, inp, generator=gen) * inp ** -0.5).to(dtype)
    x = torch.randn(m, inp, generator=gen).to(dtype)
    packed = PackedLinear(w, None)
    ref = F.linear(x.double(), w.double())
    scale = ref.abs().max().item()
    err_torch = (F.linear(x, w).double() - ref).abs().max().item() / scale
    err_packed = (packed(x).double() - ref).abs().max().item() / scale
    calls = max(1, int(2e8 / (2 * m * out * inp)))  # ~0.2 GFLOP a timing
    plain_fn, packed_fn = (lambda: F.linear(x, w)), (lambda: packed(x))
    plain_fn(), packed_fn()
    plain = packed_s = float("inf")
    for _ in range(repeats):  # interleaved, so both see the same load
        plain = min(plain, best_seconds(plain_fn, calls, 1))
        packed_s = min(packed_s, best_seconds(packed_fn, calls, 1))
    flops = 2 * m * out * inp
    return {"m": m, "out": out, "in": inp, "f_linear_us": plain * 1e6, "packed_us": packed_s * 1e6,
            "f_linear_gflops": flops / plain / 1e9, "packed_gflops": flops / packed_s / 1e9,
            "speedup": plain / packed_s, "rel_err_f_linear": err_torch, "rel_err_packed": err_packed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 2048], help="token counts")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/out/cpu_gemm.json")
    args = parser.parse_args()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | shape | M | F.linear µs | packed µs | F.linear GFLOP/s | packed GFLOP/s | packed speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name_dtype in dtypes:
        dtype = getattr(torch, name_dtype)
        for name, out, inp in SHAPES:
            for m in args.m:
                if name == "lm_head" and m > 256:
                    continue  # the lm_head only runs on sampling rows
                r = {"dtype": name_dtype, "shape": name, **measure(out, inp, m, dtype, args.repeats)}
                rows.append(r)
                print(f"| {name_dtype} | {name} | {m} | {r['f_linear_us']:.1f} | {r['packed_us']:.1f} | "
                      f"{r['f_linear_gflops']:.0f} | {r['packed_gflops']:.0f} | {r['speedup']:.2f}× |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
