"""The native CPU ops: C sources (``*.c``, ``*.h``) compiled on first use with the system ``cc``
(``-march=native``, OpenMP) into the cache root, and loaded through ctypes. Each wrapper keeps a
torch reference it is tested against; where no compiler is found the torch path runs instead.

    build.py       compiling the shared library, cached by a hash of sources, flags, CPU and compiler
    native.py      loading it (load_native); NativeOps, the adapter paths per fused projection
    tied_delta.py  the tied path's delta handed to the op that consumes the projection (tied_delta.h)
    batch.py       the step's adapter batch laid out as the C ops read it (group_apply.c, group_amx.c)
    attention.py   paged decode and prefill attention (paged_attention.c, paged_prefill.c)
    layer_ops.py   RMSNorm + residual, RoPE in place, SiLU · up (layer_ops.c)
    gemm.py        the base GEMMs on weights packed once (gemm.c), or oneDNN's prepacked GEMMs
"""
