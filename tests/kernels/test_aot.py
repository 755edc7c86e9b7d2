"""Every Triton kernel compiles ahead of time for CUDA sm_80 and sm_90, fp32 and bf16, on the CPU."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
from nlora_serve.kernels.aot import compile_all
done = compile_all(capabilities=(80, 90), dtypes=("fp32", "bf16"), ranks=(16,))
for c in done:
    print(c.kernel, c.variant, c.capability, c.dtype, c.rank, c.ptx_bytes, c.cubin_bytes)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # A subprocess: this process decorated the kernels for the interpreter (conftest), and a
    # fresh cache dir so every kernel is really compiled, not read back from ~/.triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line.split() for line in proc.stdout.splitlines()]


def test_every_kernel_variant_compiles_for_sm80_and_sm90(compiled):
    kernels = {"_sgmv_shrink_kernel", "_bgmv_shrink_kernel", "_mix_kernel", "_sgmv_expand_kernel"}
    assert {row[0] for row in compiled} == kernels
    assert len(compiled) == 8 * 2 * 2  # 8 variants × (sm_80, sm_90) × (fp32, bf16)
    assert {(row[2], row[3]) for row in compiled} == {(c, d) for c in ("80", "90")
                                                      for d in ("fp32", "bf16")}
    for row in compiled:
        assert int(row[5]) > 0 and int(row[6]) > 0, f"no PTX or cubin for {row}"
