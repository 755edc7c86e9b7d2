"""Adapter kernel cost per decoder layer of the default model, against that layer's base GEMMs.

    .venv/bin/python bench/adapter_kernels.py [--tokens 64 512] [--dtypes fp32 bf16] [--rounds 15]

Random weights of SmolLM2-135M's shapes (hidden 576, q 576, kv 192, intermediate 1536), r = 16,
all seven projections, laid out as the engine runs them: q/k/v and gate/up fused, so a layer's
base is four ``F.linear`` GEMMs and each module's y is a column view of its fused output. For each
path the adapter time of one whole layer on precomputed base outputs (seven ``apply_adapters``
calls; ``tied64_native`` / ``lora8_native``: four calls of the native CPU op, one per fused
output, as the engine runs tied and LoRA tenants on the CPU) is divided by the time of the same layer's base GEMMs at the same T. Base and paths are timed in interleaved rounds and
the median round is kept, so a noisy shared machine moves both sides alike.

On CUDA every run is captured once into a CUDA graph and timed by replay (GPU time, no Python
launch overhead), the default token counts add 4096 and 16384 (sizes where a launch runs well
past its fixed cost), and each path also gets its bounding rate: the larger of its minimum bytes
over the device-to-device copy bandwidth and its FLOPs over the GEMM rate of its dtype (bf16 on
tensor cores; fp32 with TF32 off, as the kernels' "ieee" dots), both measured in the same run;
`of bound` = bound time / measured time (issue 4's GPU target: tied and family >= 70%).
Writes bench/out/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora_serve.kernels import TIED, SiteWeights, apply_adapters, build_adapter_batch
from nlora_serve.kernels.native import load_native

HIDDEN, KV, INTER, RANK, TENANTS = 576, 192, 1536, 16, 64
# The engine's four GEMMs per layer (engine/llama.py fuses q/k/v and gate/up): (in, module outs)
GROUPS = [(HIDDEN, (HIDDEN, KV, KV)), (HIDDEN, (HIDDEN,)), (HIDDEN, (INTER, INTER)),
          (INTER, (HIDDEN,))]
SHAPES = [(i, o) for i, outs in GROUPS for o in outs]  # (in, out) of q, k, v, o, gate, up, down
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, iters: int) -> float:
    """Mean seconds per call over ``iters`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _graphed(fn):
    """fn captured once into a CUDA graph; the returned callable replays it (GPU time only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _layer(dtype, device, gen):
    """The fused base weights [Σ outs, in] of one decoder layer, one per engine GEMM."""
    return [torch.randn(sum(outs), i, generator=gen).div_(i ** 0.5).to(device, dtype)
            for i, outs in GROUPS]


def _sites(weights, mode: str, dtype, device, gen):
    """Per group, per module pools: 64 tied tenants, one shared family, or 8 own-A/B tenants.

    Tied N lives in one [S, 7, R, R] tensor and each module sees a slice, as in TiedPool; tied_b
    is the strided view W[:, :R] and tied_bt its contiguous transpose, as TiedPool.kernel_site
    hands them over.
    """
    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    # Tiny N: timing loops add into y over and over; the tied z feeds back from y.
    n_all = rnd(TENANTS, len(SHAPES), RANK, RANK, scale=1e-4)
    groups, site = [], 0
    for w, (dim_in, outs) in zip(weights, GROUPS):
        sites, row = [], 0
        for out in outs:
            fams = {"tied": 0, "family": 1, "lora": 8}[mode]
            a = rnd(max(fams, 1), RANK, dim_in, scale=dim_in ** -0.5) if fams else None
            b = rnd(max(fams, 1), out, RANK, scale=1e-2) if fams else None
            tied_b = w[row:row + out, :RANK]
            sites.append(SiteWeights(n_all[:, site], a, b, tied_b=tied_b,
                                     tied_bt=tied_b.t().contiguous()))
            site, row = site + 1, row + out
        groups.append((sites, outs))
    return groups


def _batch(mode: str, num_tokens: int, device, gen):
    """The step's metadata for one tenant mix."""
    if mode == "none":
        slots = torch.full((num_tokens,), -1)
    elif mode == "one":
        slots = torch.zeros(num_tokens, dtype=torch.int64)
    elif mode == "lora8":
        slots = torch.randint(0, 8, (num_tokens,), generator=gen)
    else:  # 64 distinct tenants, each once per 64 tokens, in random order
        slots = torch.randperm(num_tokens, generator=gen) % TENANTS
    fams = {"tied64": torch.full((TENANTS,), TIED), "family64": torch.zeros(TENANTS),
            "lora8": torch.arange(TENANTS) % 8, "one": torch.zeros(TENANTS),
            "none": torch.zeros(TENANTS)}[mode].long()
    # Scaling 1: the pools fold s into N, so the engine's batches always carry s = 1.
    return build_adapter_batch(slots, torch.full((TENANTS,), RANK), torch.ones(TENANTS), fams,
                               device=device)


# path -> the pools it uses; each module's adapter runs on its column view of the fused output
PATHS = {"tied64": "tied", "family64": "family", "lora8": "lora", "one": "lora", "none": "lora"}


def _adapter_run(groups, batch, xs, ys):
    """One layer's adapter calls: one apply_adapters per module, on its column view."""
    calls = [(view, x, site) for (sites, outs), x, y in zip(groups, xs, ys)
             for site, view in zip(sites, y.split(list(outs), dim=1))]
    return lambda: [apply_adapters(view, x, batch, site) for view, x, site in calls]


def _native_run(native, groups, batch, ys):
    """One layer through the native tied op: one call per fused GEMM output (what the engine runs)."""
    calls = [(y, native.plan(sites, list(outs))) for (sites, outs), y in zip(groups, ys)]
    return lambda: [native.tied_apply(y, batch, plan) for y, plan in calls]


def _native_group_run(native, groups, batch, xs, ys):
    """One layer through the native group op: one call per fused GEMM output."""
    calls = [(y, x, native.plan_group(sites, list(outs))) for (sites, outs), x, y in zip(groups, xs, ys)]
    return lambda: [native.group_apply(y, x, batch, plan) for y, x, plan in calls]


def bench_one(dtype_name: str, num_tokens: int, device: str, rounds: int, native=None) -> dict:
    """Median-of-rounds layer times (seconds) for the base GEMMs and every path."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[dtype_name]
    weights = _layer(dtype, device, gen)
    xs = [torch.randn(num_tokens, w.shape[1], generator=gen).to(device, dtype) for w in weights]
    ys = [F.linear(x, w) for x, w in zip(xs, weights)]
    runs = {"base": lambda: [F.linear(x, w) for x, w in zip(xs, weights)]}
    for path, mode in PATHS.items():
        groups = _sites(weights, mode, dtype, device, gen)
        batch = _batch(path, num_tokens, device, gen)
        runs[path] = _adapter_run(groups, batch, xs, ys)
        if path == "tied64" and native is not None:
            runs["tied64_native"] = _native_run(native, groups, batch, ys)
        if path == "lora8" and native is not None:
            runs["lora8_native"] = _native_group_run(native, groups, batch, xs, ys)
    slots = torch.randperm(num_tokens, generator=gen) % TENANTS
    facts = (torch.full((TENANTS,), RANK), torch.ones(TENANTS),
             torch.full((TENANTS,), TIED))
    if device == "cuda":  # the metadata build copies from the host: not capturable, left as is
        runs = {k: _graphed(fn) for k, fn in runs.items()}
    runs["metadata"] = lambda: build_adapter_batch(slots, *facts, device=device)
    iters = max(3, int(2e-2 / max(_time(runs["base"], device, 3), 1e-6)))
    samples = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            samples[name].append(_time(fn, device, iters))
    return {k: statistics.median(v) for k, v in samples.items()}


def _cuda_rates(device: str) -> dict:
    """Copy bandwidth (bytes/s) and GEMM rates (FLOP/s, bf16 and fp32 without TF32), now."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    _time(lambda: dst.copy_(src), device, 3)
    copy = _time(lambda: dst.copy_(src), device, 20)
    rates = {"copy_bytes_per_s": 2 * src.numel() / copy}
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels' fp32 dots are "ieee"
    for name, dtype in DTYPES.items():
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        _time(lambda: a @ a, device, 3)
        rates[f"gemm_{name}_flop_per_s"] = 2 * 8192 ** 3 / _time(lambda: a @ a, device, 10)
    return rates


def _min_work(path: str, num_tokens: int, elem: int) -> tuple[float, float]:
    """(bytes, FLOPs) a path cannot do without, per layer.

    Bytes: y read and written for every adapted row, each distinct N, A and B once, x once for
    a path with a shrink (the tied path reads z from y's rows it rewrites anyway). FLOPs:
    2·T·(in·r + r² + r·out) per module (no shrink on the tied path).
    """
    if path == "none":
        return 0.0, 0.0
    families = {"lora8": 8, "one": 1}.get(path, 1)
    nbytes = flops = 0.0
    for dim_in, out in SHAPES:
        nbytes += 2 * num_tokens * out * elem + min(num_tokens, TENANTS) * RANK * RANK * elem
        nbytes += families * out * RANK * elem
        flops += 2 * num_tokens * (RANK * RANK + RANK * out)
        if not path.startswith("tied64"):
            nbytes += num_tokens * dim_in * elem + families * RANK * dim_in * elem
            flops += 2 * num_tokens * dim_in * RANK
    return nbytes, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+",
                        help="tokens per step (default: 64 512; on CUDA also 4096 16384)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = _cuda_rates(device) if device == "cuda" else {}
    tokens = args.tokens or ([64, 512, 4096, 16384] if device == "cuda" else [64, 512])
    native = load_native(args.out.parent / "kernels-build") if device == "cpu" else None
    rows = []
    print(f"device {device}, torch threads {torch.get_num_threads()}, r={RANK}, one decoder layer "
          f"(7 projections) of the default model; ratio = adapter / base GEMMs")
    if rates:
        print(f"measured now: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), GEMM "
              f"bf16 {rates['gemm_bf16_flop_per_s'] / 1e12:.0f} / fp32 "
              f"{rates['gemm_fp32_flop_per_s'] / 1e12:.1f} TFLOP/s; CUDA-graph replay times")
    print(f"{'dtype':5} {'T':>5} {'path':12} {'layer us':>9} {'base us':>9} {'ratio':>7}")
    for dtype_name in args.dtypes:
        for num_tokens in tokens:
            t = bench_one(dtype_name, num_tokens, device, args.rounds, native)
            for path in [p for p in (*PATHS, "tied64_native", "lora8_native", "metadata") if p in t]:
                row = {"dtype": dtype_name, "tokens": num_tokens, "path": path,
                       "layer_s": t[path], "base_s": t["base"], "ratio": t[path] / t["base"]}
                if rates and path not in ("metadata", "none"):
                    nbytes, flops = _min_work(path, num_tokens, DTYPES[dtype_name].itemsize)
                    bound = max(nbytes / rates["copy_bytes_per_s"],
                                flops / rates[f"gemm_{dtype_name}_flop_per_s"])
                    row.update(bytes_per_s=nbytes / t[path], flop_per_s=flops / t[path],
                               bound_s=bound, of_bound=bound / t[path])
                rows.append(row)
                extra = ""
                if "of_bound" in row:
                    extra = (f"  {row['bytes_per_s'] / 1e9:7.1f} GB/s {row['flop_per_s'] / 1e12:6.1f}"
                             f" TFLOP/s  {row['of_bound']:4.0%} of bound")
                note = "  (per step, all 30 layers)" if path == "metadata" else ""
                print(f"{dtype_name:5} {num_tokens:5d} {path:12} {t[path] * 1e6:9.1f} "
                      f"{t['base'] * 1e6:9.1f} {row['ratio']:7.3f}{extra}{note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "threads": torch.get_num_threads(),
                                    "rates": rates, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
