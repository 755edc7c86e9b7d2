"""Ahead-of-time CUDA compile of every Triton kernel at the engine's launches, no GPU needed.

The interpreter runs programs one after another on the CPU, so it cannot see what the GPU
compiler rejects (e.g. tl.dot with a dimension under 16) nor what the compiled code looks like.
Here the Triton path (:func:`~nlora_serve.kernels.triton_ops.triton_path.apply_triton`) runs on CPU tensors
laid out as the engine lays them out (DESIGN §4, §5): one SmolLM2-135M decoder layer, q/k/v and
gate/up fused so every module's y is a column view, N a strided slice of the [S, sites, R, R]
pool, tied_b the strided view W[:, :R]. Each kernel launch is captured instead of run, given the
specialisation Triton's JIT would give the same arguments on a GPU (ints equal to 1 become
constants, 16-divisible ints and 16-aligned pointers get the divisibility hint: this is what
lets the compiler vectorise loads), and compiled for sm_80 and sm_90. From each cubin it reads
what decides speed before any GPU runs it: registers per thread, spills to local memory, and
whether the dots run on tensor cores (HMMA/HGMMA) and the loads are vectorised (LDG.64/.128).
The paged attention kernels are compiled the same way at a decode and a prefill launch of the
default model's head shape and of a Llama-3-8B one.

Run it as ``python -m nlora_serve.kernels.triton_ops.aot [ranks...]`` (not under TRITON_INTERPRET=1: the
kernels must be decorated as compilable JIT functions).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.metadata import TIED, build_adapter_batch
from nlora_serve.kernels.triton_ops.paged_decode_attention import decode_num_splits, paged_decode_attention
from nlora_serve.kernels.triton_ops.paged_prefill_attention import paged_prefill_attention
from nlora_serve.kernels.triton_ops.tied_fused import tied_fused
from nlora_serve.kernels.triton_ops.triton_path import apply_triton, apply_triton_per_token
from nlora_serve.kernels.weights import KernelSiteWeights

# SmolLM2-135M: hidden 576, kv 192, intermediate 1536; the engine's fused GEMMs (in, module outs)
_GROUPS = ((576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,)))
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_TENANTS = 64
# Steps the engine runs: (name, tokens, how slots are drawn, families per slot)
# ("-graph": the fixed-grid decode form that CUDA graphs replay, apply_triton_per_token; "-fused": the
# same with tied_form="fused", kernels/triton_ops/tied_fused.py; "-zcols": tied_fused reading z from a buffer;
# "-tiled": tied_form="tiled", mix then kernels/triton_ops/tied_expand.py; "-bgmv": group_form="bgmv", the
# earlier group kernels instead of the grouped ones; "prefill-lora-4096": one K range per program)
_STEPS = (("decode-tied", 64, "distinct", "tied"), ("decode-lora", 64, "distinct", "lora8"),
          ("prefill-lora", 512, "one", "lora8"), ("prefill-lora-4096", 4096, "distinct", "lora8"),
          ("prefill-lora-bgmv", 512, "one", "lora8"), ("decode-lora-graph-bgmv", 64, "distinct", "lora8"),
          ("decode-tied-bias", 64, "distinct", "tied"),
          ("decode-tied-graph", 64, "distinct", "tied"), ("decode-lora-graph", 64, "distinct", "lora8"),
          ("decode-tied-fused", 64, "distinct", "tied"), ("prefill-tied-fused", 4096, "distinct", "tied"),
          ("decode-tied-zcols", 64, "distinct", "tied"), ("decode-tied-tiled", 64, "distinct", "tied"))
# Attention (rank 0 in the table): (query heads, KV heads, head_dim) of SmolLM2-135M and of a
# Llama-3-8B shape; block_size 16, max_model_len 2048 (4 decode splits), q a strided view of qkv.
_ATTN_SHAPES = ((9, 3, 64), (32, 8, 128))
_ATTN_STEPS = ("decode-attn", "prefill-attn")
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass(frozen=True, slots=True)
class Compiled:
    """One distinct kernel specialisation's AOT result.

    ``variant`` names its boolean constexprs; ``steps`` the engine steps that launch it. Sizes
    in bytes; ``registers`` per thread; ``spill_ops`` = local-memory loads + stores in the SASS
    (0: nothing spilled); ``mma_ops`` tensor-core instructions; ``wide_loads`` 64/128-bit global
    loads; ``loads`` all global loads (LDG); ``async_wide_loads`` 64/128-bit cp.async copies from
    global to shared memory (LDGSTS: what a software-pipelined loop issues instead).
    """

    kernel: str
    capability: int
    dtype: str
    rank: int
    variant: str
    steps: tuple[str, ...]
    ptx_bytes: int
    cubin_bytes: int
    registers: int
    spill_ops: int
    mma_ops: int
    wide_loads: int
    loads: int
    async_wide_loads: int


@dataclass(slots=True)
class _Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _captured_launches():
    """Within the block, ``kernel[grid](...)`` records the call instead of launching it."""
    launches: list[_Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(_Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _specialise(launch: _Launch):
    """(signature, constexprs, attrs, options) as Triton's JIT would build them for this call."""
    params = launch.fn.params
    values = dict(zip((p.name for p in params), launch.args)) | {
        k: v for k, v in launch.kwargs.items() if k in launch.fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", spec
        else:
            signature[param.name] = kind
            if spec == "D":
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages")}
    return signature, constexprs, attrs, options


def _layer_sites(dtype: torch.dtype, rank: int, bias: bool, gen: torch.Generator):
    """Per fused GEMM: (x [T-less: in], fused out width, per-module KernelSiteWeights)."""
    sites_total = sum(len(outs) for _, outs in _GROUPS)
    n_all = torch.randn(_TENANTS, sites_total, rank, rank, generator=gen).to(dtype)
    layer, site = [], 0
    for dim_in, outs in _GROUPS:
        weight = torch.randn(sum(outs), dim_in, generator=gen).to(dtype)
        sites, row = [], 0
        for out in outs:
            a = torch.randn(8, rank, dim_in, generator=gen).to(dtype)
            b = torch.randn(8, out, rank, generator=gen).to(dtype)
            tied_b = weight[row:row + out, :rank]
            sites.append(KernelSiteWeights(n_all[:, site], a, b, tied_b=tied_b, tied_a=weight[row:row + rank],
                                     tied_bias=torch.randn(rank).to(dtype) if bias else None))
            site, row = site + 1, row + out
        layer.append((dim_in, outs, sites))
    return layer


def _step_launches(dtype: torch.dtype, rank: int, step: tuple) -> list[_Launch]:
    """Every kernel launch of one decoder layer in one engine step, captured."""
    name, tokens, draw, families = step
    gen = torch.Generator().manual_seed(0)
    slots = (torch.randperm(tokens, generator=gen) % _TENANTS if draw == "distinct"
             else torch.zeros(tokens, dtype=torch.int64))
    fams = torch.full((_TENANTS,), TIED) if families == "tied" else torch.arange(_TENANTS) % 8
    batch = build_adapter_batch(slots, torch.full((_TENANTS,), rank), torch.ones(_TENANTS), fams)
    group_form = "bgmv" if name.endswith("-bgmv") else None
    if name.removesuffix("-bgmv").endswith(("-graph", "-fused", "-zcols", "-tiled")):
        form = {"-fused": "fused", "-tiled": "tiled"}.get(name[name.rindex("-"):], "two_launch")

        def apply(y, x, b, site):
            if name.endswith("-zcols"):  # z: a [T, R] column view of another buffer (x's, here)
                return tied_fused(x, None, site.tied_b, site.n_pool, b.tok_tied_slot, y, rank, b.slot_scalings,
                                  z=x[:, :rank])
            return apply_triton_per_token(y, x, b, site, tied_form=form, group_form=group_form)
        batch = derive_per_token_batch(slots.to(torch.int32), fams.to(torch.int32), torch.ones(_TENANTS), rank,
                                       families == "tied", families != "tied")
    else:
        def apply(y, x, b, site):
            return apply_triton(y, x, b, site, group_form=group_form)
    with _captured_launches() as launches:
        for dim_in, outs, sites in _layer_sites(dtype, rank, name.endswith("bias"), gen):
            x = torch.randn(tokens, dim_in, generator=gen).to(dtype)
            fused = torch.randn(tokens, sum(outs), generator=gen).to(dtype)
            for view, site in zip(fused.split(list(outs), dim=1), sites):
                apply(view, x, batch, site)
    return launches


def _attention_launches(dtype: torch.dtype, shape: tuple, step: str) -> list[_Launch]:
    """The paged attention launches of one layer: 64 decodes, or one 512-token prefill chunk."""
    heads, kv_heads, dim = shape
    tokens = 64 if step == "decode-attn" else 512
    kv = torch.zeros(2, 256, 16, kv_heads, dim, dtype=dtype)
    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    out = torch.empty(tokens, heads, dim, dtype=dtype)
    tables = torch.zeros(tokens, 128, dtype=torch.int32)
    lens = torch.full((tokens,), 1000, dtype=torch.int64)
    with _captured_launches() as launches:
        if step == "decode-attn":
            paged_decode_attention(q, kv, tables, lens, dim ** -0.5, out, decode_num_splits(2048))
        else:
            starts = torch.tensor([0, tokens], dtype=torch.int64)
            paged_prefill_attention(q, kv, starts, lens[:1], tables[:1], tokens, dim ** -0.5, out)
    return launches


def _sass_facts(cubin: bytes, workdir: Path) -> dict:
    """Registers, spill instructions, tensor-core and wide-load counts read from a cubin."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", path], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([_CUOBJDUMP, "--dump-sass", path], capture_output=True, text=True,
                          check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "mma_ops": len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)),
            "wide_loads": len(re.findall(r"\bLDG\.E\.(?:64|128)\b", sass)),
            "loads": len(re.findall(r"\bLDG\b", sass)),
            # cp.async copies, what a software-pipelined loop issues instead of LDG
            "async_wide_loads": len(re.findall(r"\bLDGSTS\.E\.(?:BYPASS\.)?(?:LTC128B\.)?(?:64|128)\b", sass))}


def compile_all(capabilities=(80, 90), dtypes=("fp32", "bf16"), ranks=(16,),
                workdir: Path | None = None) -> list[Compiled]:
    """Compile every distinct kernel specialisation the engine's steps launch.

    For each (capability, dtype, rank): the launches of one decoder layer in each step of
    ``_STEPS`` (tied decode, LoRA decode and prefill, tied with a bias, both decode forms CUDA
    graphs replay), deduplicated by
    specialisation. Intermediates (z, u) are fp32, as the launchers allocate them. Then per
    (capability, dtype), recorded with rank 0: the paged attention launches of ``_ATTN_STEPS``
    at each head shape of ``_ATTN_SHAPES`` (steps named e.g. ``decode-attn-d64``).

    Raises:
        whatever the Triton compiler raises for a kernel it rejects;
        subprocess.CalledProcessError: cuobjdump failed on a cubin.
    """
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        for dtype in dtypes:
            for rank in ranks:
                variants: dict = {}
                steps = [(step[0], _step_launches(_DTYPES[dtype], rank, step)) for step in _STEPS]
                _add_variants(variants, steps)
                _compile(done, variants, capabilities, dtype, rank, work)
            variants = {}
            _add_variants(variants, [(f"{step}-d{shape[2]}", _attention_launches(_DTYPES[dtype], shape, step))
                                     for shape in _ATTN_SHAPES for step in _ATTN_STEPS])
            _compile(done, variants, capabilities, dtype, 0, work)
    return done


def _add_variants(variants: dict, steps: list) -> None:
    """Deduplicate launches by specialisation; each variant remembers the steps that launch it."""
    for step, launches in steps:
        for launch in launches:
            sig, consts, attrs, options = _specialise(launch)
            key = (launch.fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.items())))
            entry = variants.setdefault(key, [launch.fn, sig, consts, attrs, options, []])
            if step not in entry[5]:
                entry[5].append(step)


def _compile(done: list, variants: dict, capabilities, dtype: str, rank: int, work: Path) -> None:
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for fn, sig, consts, attrs, options, steps in variants.values():
            binary = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
            flags = ",".join(k for k, v in sorted(consts.items()) if isinstance(v, bool) and v) or "-"
            done.append(Compiled(fn.__name__, cap, dtype, rank, flags, tuple(steps),
                                 len(binary.asm["ptx"]), len(binary.asm["cubin"]),
                                 **_sass_facts(binary.asm["cubin"], work)))


def main() -> None:
    ranks = tuple(int(a) for a in sys.argv[1:]) or (16, 64)
    print(f"{'target':6} {'dtype':5} {'r':>3} {'kernel':20} {'flags':17} {'regs':>4} {'spill':>5} "
          f"{'mma':>4} {'ldg wide/all':>12} {'cp.async':>8}  steps")
    for c in compile_all(ranks=ranks):
        print(f"sm_{c.capability:<3} {c.dtype:5} {c.rank:3d} {c.kernel:20} {c.variant:17} "
              f"{c.registers:4d} {c.spill_ops:5d} {c.mma_ops:4d} {c.wide_loads:5d}/{c.loads:<6d} {c.async_wide_loads:8d}"
              f"  {' '.join(c.steps)}")


if __name__ == "__main__":
    main()
