"""Batched x·A·N·B for mixed tenants: batch metadata, the dispatch entry, torch and Triton paths,
and the native CPU ops (``native.py``: the tied path per fused projection, paged decode attention).

Imports nothing else of ours (DESIGN §2). Triton is imported only when a CUDA tensor needs it.
"""

from nlora_serve.kernels.dispatch import apply_adapters
from nlora_serve.kernels.metadata import NO_ADAPTER, TIED, AdapterBatch, build_adapter_batch
from nlora_serve.kernels.weights import SiteWeights

__all__ = ["NO_ADAPTER", "TIED", "AdapterBatch", "SiteWeights", "apply_adapters",
           "build_adapter_batch"]
