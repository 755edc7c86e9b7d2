"""Every Triton kernel compiles ahead of time for CUDA sm_80 and sm_90, fp32 and bf16, at the
engine's launches, on the CPU; the cubins spill nothing and bf16 dots run on tensor cores.
The paged attention kernels are recorded with rank 0 (they have none)."""

import json
import os
import subprocess
import sys

import pytest

RANKS = (16, 64)
SCRIPT = """
import dataclasses, json, sys
from nlora_serve.kernels.triton_ops.aot import compile_all
for c in compile_all(capabilities=(int(sys.argv[1]),), dtypes=("fp32", "bf16"), ranks={ranks!r}):
    print(json.dumps(dataclasses.asdict(c)))
"""
KERNELS = {"_sgmv_shrink_kernel", "_bgmv_shrink_kernel", "_mix_kernel", "_sgmv_expand_kernel",
           "_grouped_shrink_kernel", "_grouped_expand_kernel",
           "_bgmv_expand_kernel", "_tied_fused_kernel", "_tied_expand_kernel"}
ATTENTION = {"_paged_decode_attention_kernel", "_paged_decode_merge_kernel",
             "_paged_prefill_attention_kernel"}
DOTS = {"_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_tied_fused_kernel", "_tied_expand_kernel",
        "_grouped_shrink_kernel", "_grouped_expand_kernel",
        "_paged_decode_attention_kernel",
        "_paged_prefill_attention_kernel"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # A subprocess: this process decorated the kernels for the interpreter (conftest), and a
    # fresh cache dir so every kernel is really compiled, not read back from ~/.triton.
    # One process per capability, side by side: the compiles are single-threaded (~2 min in one).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")),
               TRITON_DEFAULT_FP_FUSION="1")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT.format(ranks=RANKS), str(cap)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cap in (80, 90)]
    compiled = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        compiled += [json.loads(line) for line in out.splitlines()]
    return compiled


def test_every_kernel_compiles_for_sm80_and_sm90_at_every_engine_step(compiled):
    assert {c["kernel"] for c in compiled if c["rank"]} == KERNELS
    combos = {(c["capability"], c["dtype"], c["rank"]) for c in compiled if c["rank"]}
    assert combos == {(cap, d, r) for cap in (80, 90) for d in ("fp32", "bf16") for r in RANKS}
    for combo in combos:
        rows = [c for c in compiled if (c["capability"], c["dtype"], c["rank"]) == combo]
        steps = {s for c in rows for s in c["steps"]}
        assert steps == {"decode-tied", "decode-lora", "prefill-lora", "decode-tied-bias", "decode-tied-graph",
                         "decode-lora-graph", "decode-tied-fused", "prefill-tied-fused", "decode-tied-zcols",
                         "decode-tied-tiled", "prefill-lora-4096", "prefill-lora-bgmv", "decode-lora-graph-bgmv"}
        # tied decode: mix + expand, no shrink; a bias is its own mix specialisation
        tied = {(c["kernel"], c["variant"]) for c in rows if "decode-tied" in c["steps"]}
        assert tied == {("_mix_kernel", "-"), ("_sgmv_expand_kernel", "-")}
        assert ("_mix_kernel", "HAS_BIAS") in {(c["kernel"], c["variant"]) for c in rows}
        by_step = {s: {c["kernel"] for c in rows if s in c["steps"]} for s in steps}
        # the group path's default form: grouped shrink (mix fused) + grouped expand over
        # family-sorted token blocks at every T, both forms; K (576) split over programs (atomic
        # partial sums) at 64 tokens and R = 16, one K range at R = 64 (the per-range R × R mix would
        # outweigh the split range's reads) and at 4096 tokens (enough programs without a split)
        grouped = {"_grouped_shrink_kernel", "_grouped_expand_kernel"}
        for step in ("decode-lora", "prefill-lora", "decode-lora-graph", "prefill-lora-4096"):
            assert by_step[step] == grouped, step
        shrinks = {(c["variant"], s) for c in rows if c["kernel"] == "_grouped_shrink_kernel" for s in c["steps"]}
        split = "ATOMIC," if combo[2] == 16 else ""
        assert (split + "HAS_RANKS", "decode-lora") in shrinks and (split[:-1] or "-", "decode-lora-graph") in shrinks
        assert ("HAS_RANKS", "prefill-lora-4096") in shrinks
        # the earlier group form: per-token (BGMV) shrink at decode, the segment (SGMV) one for
        # long runs, both with the mix fused
        assert by_step["prefill-lora-bgmv"] == {"_sgmv_shrink_kernel", "_sgmv_expand_kernel"}
        assert by_step["decode-lora-graph-bgmv"] == {"_bgmv_shrink_kernel", "_bgmv_expand_kernel"}
        # the graphed decode form's tied path: per-token kernels, grids of the token count
        assert by_step["decode-tied-graph"] == {"_mix_kernel", "_bgmv_expand_kernel"}
        # the one-launch tied form, at a decode and a prefill token count (same fixed grid rule)
        assert by_step["decode-tied-fused"] == by_step["prefill-tied-fused"] == {"_tied_fused_kernel"}
        assert {(c["kernel"], c["variant"]) for c in rows if "decode-tied-zcols" in c["steps"]} == {
            ("_tied_fused_kernel", "HAS_SCALE,HAS_Z")}  # z read from a buffer: no K loop
        # the tiled tied expand: mix, then one W[:, :R] tile per block of 16 tokens
        assert by_step["decode-tied-tiled"] == {"_mix_kernel", "_tied_expand_kernel"}
    for c in compiled:
        assert c["ptx_bytes"] > 0 and c["cubin_bytes"] > 0, f"no PTX or cubin for {c}"


def test_attention_compiles_for_sm80_and_sm90_at_decode_and_prefill(compiled):
    rows = [c for c in compiled if c["rank"] == 0]
    assert {c["kernel"] for c in rows} == ATTENTION
    for cap in (80, 90):
        for dtype in ("fp32", "bf16"):
            steps = {(c["kernel"], s) for c in rows if (c["capability"], c["dtype"]) == (cap, dtype)
                     for s in c["steps"]}
            for dim in (64, 128):  # SmolLM2-135M's heads and a Llama-3-8B shape
                assert {("_paged_decode_attention_kernel", f"decode-attn-d{dim}"),
                        ("_paged_decode_merge_kernel", f"decode-attn-d{dim}"),
                        ("_paged_prefill_attention_kernel", f"prefill-attn-d{dim}")} <= steps
    for c in rows:  # K/V rows are head_dim-contiguous: the gathers must be 64/128-bit loads
        if c["kernel"] != "_paged_decode_merge_kernel":
            assert c["wide_loads"] == c["loads"] > 0, f"{c['kernel']} {c['steps']} scalar loads"


def test_no_kernel_spills_registers(compiled):
    spilled = [(c["kernel"], c["capability"], c["dtype"], c["rank"], c["registers"])
               for c in compiled if c["spill_ops"]]
    assert not spilled, f"local-memory spills (LDL/STL) in {spilled}"


def test_bf16_dots_run_on_tensor_cores(compiled):
    # Shrink over segments, both expands and both attention kernels are tl.dot; in bf16 they
    # must compile to HMMA/HGMMA (an fp32 operand would silently turn them into FMA loops).
    # fp32 dots are "ieee": no mma.
    for c in compiled:
        uses_dot = c["kernel"] in DOTS
        if uses_dot and c["dtype"] == "bf16":
            assert c["mma_ops"] > 0, f"bf16 {c['kernel']} {c['variant']} has no tensor-core op"
        if c["dtype"] == "fp32":
            assert c["mma_ops"] == 0, f"fp32 {c['kernel']} uses tensor cores (tf32 misses 1e-5)"


def test_loads_are_vectorised_where_rows_are_contiguous(compiled):
    # The engine's tensors are row-contiguous: the JIT specialisation (unit strides, 16-byte
    # alignment) must let every kernel issue some 64/128-bit loads at rank 64.
    for c in compiled:
        if c["rank"] == 64:
            # (a pipelined loop's loads are cp.async copies: LDGSTS, counted apart)
            assert c["wide_loads"] + c["async_wide_loads"] > 0, f"{c['kernel']} {c['variant']} loads only scalars"
