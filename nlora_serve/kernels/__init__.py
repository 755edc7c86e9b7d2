"""The engine's compute ops: adapter deltas, attention, base GEMMs and layer ops, per device.

The folders::

    triton_ops/   the CUDA kernels in Triton (exact on CPU tensors under TRITON_INTERPRET=1): the
                  adapter ops (shrink, mix, expand; the tied path's fused forms), paged decode and
                  prefill attention, their launch configs and the ahead-of-time compile check
    cpu/          the native CPU ops: C sources compiled on first use, and their ctypes wrappers
                  (tied and group adapter paths, paged attention, RMSNorm / RoPE / SiLU · up, the
                  base GEMMs)

Here, what every device shares::

    metadata.py            the step's adapter batch (AdapterBatch): each token's adapter slot, segments
    weights.py             KernelSiteWeights: the pools' view of one fused projection
    dispatch.py            apply_adapters: Triton on CUDA tensors, the torch path on the CPU
    torch_ops.py           the torch path (any device; the CPU's fallback where no compiler is found)
    reference.py           torch reference ops, one per Triton op (float64 inputs: the tests' truth)
    reference_attention.py paged attention's torch reference

Which of them the engine calls when: engine/model/adapter_layer.py's docstring.

Imports nothing else of ours (DESIGN §2). The names below are the adapter path's; importing this
package does not import Triton (``dispatch.py`` imports the Triton path only when it runs).
"""

from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, TIED, AdapterBatch, build_adapter_batch
from nlora_serve.kernels.weights import KernelSiteWeights

__all__ = ["NO_ADAPTER", "TIED", "AdapterBatch", "KernelSiteWeights", "apply_adapters",
           "build_adapter_batch"]
