"""CPU GEMMs per shape: torch's ``F.linear``, the same weight prepacked once for oneDNN, and ours.

Issue 22: the engine's base GEMMs on the CPU. For each projection of the model (q/k/v fused,
o, gate/up fused, down, the lm_head) and each token count M, the three ways are timed side by side
in one run, interleaved, best of ``--repeats`` (the box is shared: the best is the least
disturbed), and the ratios printed. Prepacking reorders W into oneDNN's blocked layout once at
load, so no call repacks it (``F.linear`` lets oneDNN / MKL repack or stream the plain layout on
every call); ours (``NativeLinear``, cpu/gemm.c) packs W into 48-column panels. Each call reads the
next of ``--layers`` copies of the weight, so weights come cold from memory as in the engine.

    .venv/bin/python bench/cpu_gemm.py                       # default model's shapes, fp32 and bf16
    .venv/bin/python bench/cpu_gemm.py --m 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora_serve.kernels.cpu.gemm import NativeLinear, PackedLinear
from nlora_serve.kernels.cpu.native import load_native

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


def measure(out: int, inp: int, m: int, dtype: torch.dtype, repeats: int, layers: int, gemm) -> dict:
    """F.linear vs PackedLinear vs NativeLinear (when ``gemm``) for one shape, each call on the next
    of ``layers`` copies of the weight (cold in cache, as in a model's walk over its layers); the
    outputs are compared against float64 too."""
    gen = torch.Generator().manual_seed(0)
    ws = [(torch.randn(out, inp, generator=gen) * inp ** -0.5).to(dtype) for _ in range(layers)]
    x = torch.randn(m, inp, generator=gen).to(dtype)
    ways = {"f_linear": [functools.partial(F.linear, weight=w) for w in ws],
            "packed": [PackedLinear(w, None) for w in ws]}
    if gemm is not None and gemm.supports(dtype):
        ways["native"] = [NativeLinear(w, None, gemm) for w in ws]
    ref = F.linear(x.double(), ws[0].double())
    scale = ref.abs().max().item()
    row = {"m": m, "out": out, "in": inp}
    for name, fns in ways.items():
        row[f"rel_err_{name}"] = (fns[0](x).double() - ref).abs().max().item() / scale
    calls = layers * max(1, int(2e8 / (2 * m * out * inp * layers)))  # ~0.2 GFLOP a timing, whole walks
    walk = {name: (lambda fns=fns: [fns[i % layers](x) for i in range(calls)]) for name, fns in ways.items()}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):  # interleaved, so all see the same load
        for name, fn in walk.items():
            best[name] = min(best[name], best_seconds(fn, 1, 1) / calls)
    flops = 2 * m * out * inp
    for name, seconds in best.items():
        row[f"{name}_us"], row[f"{name}_gflops"] = seconds * 1e6, flops / seconds / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 2048], help="token counts")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30,
                        help="copies of each weight cycled through (30: the default model's layers, weights cold)")
    parser.add_argument("--out", default="bench/out/cpu_gemm.json")
    args = parser.parse_args()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    native = load_native(Path(tempfile.mkdtemp(prefix="nlora-gemm-")))
    gemm = native.gemm if native is not None else None
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} copies of each weight cycled")
    print("| dtype | shape | M | F.linear µs | oneDNN packed µs | ours µs | F.linear GFLOP/s | packed GFLOP/s | "
          "ours GFLOP/s | packed / F.linear | ours / packed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name_dtype in dtypes:
        dtype = getattr(torch, name_dtype)
        for name, out, inp in SHAPES:
            for m in args.m:
                if name == "lm_head" and m > 256:
                    continue  # the lm_head only runs on sampling rows
                layers = 2 if name == "lm_head" else args.layers  # 57-113 MB a copy: cold anyway
                r = {"dtype": name_dtype, "shape": name, **measure(out, inp, m, dtype, args.repeats, layers, gemm)}
                rows.append(r)
                ours = r.get("native_us", float("nan"))
                print(f"| {name_dtype} | {name} | {m} | {r['f_linear_us']:.1f} | {r['packed_us']:.1f} | {ours:.1f} | "
                      f"{r['f_linear_gflops']:.0f} | {r['packed_gflops']:.0f} | {r.get('native_gflops', float('nan')):.0f} | "
                      f"{r['f_linear_us'] / r['packed_us']:.2f}× | {r['packed_us'] / ours:.2f}× |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
