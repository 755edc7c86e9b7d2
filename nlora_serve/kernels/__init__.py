"""The engine's compute ops: adapter deltas, attention, base GEMMs and layer ops, per device.

- Adapter deltas y += s · B N A x for mixed tenants: step metadata (``metadata.py``,
  ``native_batch.py``, ``per_token_batch.py``), the torch path (``torch_ops.py``, reached through
  ``dispatch.py``), the Triton ops one per file (shrink, mix, expand: ``bgmv_*``, ``sgmv_*``,
  ``grouped_*``, ``mix.py``, ``tied_expand.py``, ``tied_fused.py``) composed in
  ``triton_path.py``, their torch references (``reference.py``), and the pools' view
  (``weights.py``). Which of them the engine calls when: engine/adapter_layer.py's docstring.
- Native CPU ops in C (``cpu/``), loaded by ``native.py`` through ctypes and compiled on first use
  by ``native_build.py``: the tied and group adapter paths (``native.py``, ``tied_delta.py``),
  paged attention (``native_attention.py``), RMSNorm / RoPE / SiLU · up (``layer_ops.py``) and the
  base GEMMs (``cpu_gemm.py``, with oneDNN prepacking as the alternative).
- Triton paged attention for CUDA (``paged_decode_attention.py``, ``paged_prefill_attention.py``;
  references in ``reference_attention.py``).
- Launch configs (``config.py``, per-device JSON in ``configs/``), shared launcher checks
  (``launch.py``) and ``@triton.jit`` helpers (``_triton_helpers.py``), and ``aot.py``, which
  compiles every Triton kernel ahead of time for CUDA targets without a GPU.

Imports nothing else of ours (DESIGN §2). The names below are the adapter path's; importing this
package does not import Triton (``dispatch.py`` imports the Triton path only when it runs).
"""

from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, TIED, AdapterBatch, build_adapter_batch
from nlora_serve.kernels.weights import KernelSiteWeights

__all__ = ["NO_ADAPTER", "TIED", "AdapterBatch", "KernelSiteWeights", "apply_adapters",
           "build_adapter_batch"]
