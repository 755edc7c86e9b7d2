"""The CUDA kernels, in Triton. Each runs on CPU tensors under ``TRITON_INTERPRET=1`` (slow, exact),
which is how CI tests them, and ``aot.py`` compiles every one for sm_80 / sm_90 without a GPU.

Adapter ops, y += s · B N A x for each token's adapter (one op per file)::

    bgmv_shrink.py, bgmv_expand.py       per token (decode)
    sgmv_shrink.py, sgmv_expand.py       per segment of one adapter's tokens (prefill)
    grouped_shrink.py, grouped_expand.py the step's slots in one launch, mixed ranks unpadded
    mix.py                               z ← N z per token (the r×r matrix that tells tenants apart)
    tied_expand.py, tied_fused.py        the tied (IntTune) path: A and B are slices of W itself
    triton_path.py                       the ops composed into one projection's delta
    per_token_batch.py                   the per-token metadata those launches read

Attention and support::

    paged_decode_attention.py, paged_prefill_attention.py   over the paged KV cache
    config.py     launch configs: defaults, or configs/<device name>.json where tuned
    launch.py     the launchers' shared argument checks
    _triton_helpers.py  ``@triton.jit`` helpers the kernels share
    aot.py        compile every kernel ahead of time for CUDA targets; registers, spills, mma
"""
