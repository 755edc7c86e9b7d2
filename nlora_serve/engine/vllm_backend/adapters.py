"""Adapters as the vLLM backend serves them: each registered version folded to plain LoRA on disk.

vLLM knows two-matrix LoRA only, so every version is folded (DESIGN §8), on its first request
(fold_cache.py; registration checks that it can be): per site
B' = s · B · N in float64, written in float32 with scaling 1 (``lora_alpha = r``, no rsLoRA, no
patterns) and every site zero-padded to the adapter's largest rank, so the maths is exact
whatever vLLM's own scaling rules. A tied IntTune tenant becomes a full LoRA there: 19.6 MB for r=16
on all seven projections of the default model instead of 215 KB of N, on disk and in vLLM's LoRA
cache; its memory advantage is lost on this backend.

Each version gets an integer id that is never reused (vLLM's ``lora_int_id``, also in its
``lora_name``, which keys vLLM's prefix cache): a hot-swap is a new id, so no KV or prefix-cache
block computed with the old weights is ever reused for the new ones.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.keys import PART_A, PART_B, tensor_key
from nlora_serve.errors import AdapterError

LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


def check_servable(adapter: Adapter) -> None:
    """What vLLM's LoRA cannot hold, beyond what every backend checks on reading.

    Raises:
        AdapterError: the adapter has a lora_B bias (vLLM's LoRA has none).
    """
    if any(s.bias is not None for s in adapter.sites.values()):
        raise AdapterError("the vLLM backend serves no lora_B bias (lora_bias=true); fold the bias into "
                           "the base model or serve this adapter on the native backend")


def write_folded_lora(adapter: Adapter, out_dir: Path) -> int:
    """Write ``adapter`` as a plain PEFT LoRA folder with scaling folded into B; returns its bytes.

    Semantics: for every site, ``lora_A = [A; 0]`` [R, in] and ``lora_B = [s·B·N, 0]`` [out, R] with
    R the largest rank of the adapter, so ``(R/R) · lora_B @ lora_A = s · B @ N @ A`` exactly up to
    one float32 rounding of s·B·N.

    Raises:
        AdapterError: the adapter has a lora_B bias (vLLM's LoRA has none), or the folder cannot be
            written (a full disk: named, and nothing of it left).
    """
    check_servable(adapter)
    rank = _folded_rank(adapter)
    tensors = {}
    for (layer, module), s in adapter.sites.items():
        a = torch.zeros(rank, s.A.shape[1])
        b = torch.zeros(s.B.shape[0], rank)
        a[: s.rank] = s.A.float()
        b[:, : s.rank] = (s.scaling * (s.B.to(torch.float64) @ s.N.to(torch.float64))).float()
        tensors[tensor_key(layer, module, PART_A)] = a
        tensors[tensor_key(layer, module, PART_B)] = b
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": sorted({m for _, m in adapter.sites}), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}
    try:
        out_dir.mkdir()  # not its parent: gone at shutdown, a fold still running must not recreate it
        (out_dir / LORA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file(tensors, str(out_dir / LORA_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise AdapterError(f"cannot write the adapter folded for vLLM to {out_dir} "
                           f"({getattr(exc, 'strerror', None) or exc})") from None
    return sum(t.numel() for t in tensors.values())


def _folded_rank(adapter: Adapter) -> int:
    return max(s.rank for s in adapter.sites.values())


def folded_numel(adapter: Adapter) -> int:
    """Elements of :func:`write_folded_lora`'s tensors: A [R, in] and B [out, R] per site."""
    rank = _folded_rank(adapter)
    return sum(rank * (s.A.shape[1] + s.B.shape[0]) for s in adapter.sites.values())


class VllmResidency:
    """The vLLM backend's placement of registered versions (AdapterManager's ``residency``).

    ``admit`` checks that a version can be folded, gives it an id (``version.slot``) and sets
    ``version.held_bytes`` to the folded LoRA's bytes in the compute dtype (what vLLM holds for it);
    the engine folds it into ``root/<id>`` on its first request (FoldCache); ``free`` hands the id and the folder to ``on_free(id, folder)``, which drops the version from
    vLLM and then deletes the folder (vLLM may still read it until then).

    Args:
        root: folder for the folded versions (created; the engine removes it at shutdown).
        dtype: vLLM's compute dtype (for ``held_bytes``).
        q_shape: ``[out, in]`` of the base model's q_proj (for :meth:`zero_lora`).
        on_free: called with a freed version's id and folder (from whichever thread frees it);
            by default the folder is deleted at once.
    """

    def __init__(self, root: Path, dtype: torch.dtype, q_shape: tuple[int, int],
                 on_free: Callable[[int, Path], None] = lambda i, folder: shutil.rmtree(folder, ignore_errors=True)):
        self.root = Path(root)
        self._q_shape = q_shape  # [out, in] of q_proj, for the zero LoRA
        self.root.mkdir(parents=True, exist_ok=True)
        self._element_bytes = torch.empty((), dtype=dtype).element_size()
        self._on_free = on_free
        self._ids = itertools.count(1)  # vLLM needs lora_int_id >= 1
        self._lock = threading.Lock()

    def path(self, lora_id: int) -> Path:
        """The folded LoRA folder of version ``lora_id``."""
        return self.root / str(lora_id)

    def admit(self, version) -> None:
        """Check a newly registered version and give it its id; nothing is written (the engine folds
        it on its first request: :func:`write_folded_lora`).

        Raises:
            AdapterError: the adapter cannot be served as a vLLM LoRA (the message says why).
        """
        check_servable(version.adapter)
        with self._lock:
            lora_id = next(self._ids)
        version.pool, version.slot = self, lora_id
        version.held_bytes = folded_numel(version.adapter) * self._element_bytes

    def zero_lora(self) -> int:
        """Write an all-zero rank-1 LoRA once and return its id (base-model requests run on it on the
        CPU; see VllmEngine). Exact: it adds x · 0."""
        with self._lock:
            lora_id = next(self._ids)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
                  "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none", "use_rslora": False}
        out = self.path(lora_id)
        out.mkdir(parents=True)
        (out / LORA_CONFIG).write_text(json.dumps(config) + "\n")
        q = self._q_shape
        safetensors.torch.save_file({tensor_key(0, "q_proj", PART_A): torch.zeros(1, q[1]),
                                     tensor_key(0, "q_proj", PART_B): torch.zeros(q[0], 1)}, str(out / LORA_WEIGHTS))
        return lora_id

    def ensure_resident(self, version, tenant: str | None = None) -> None:
        """Nothing to do here: the engine folds the version on its request's way to vLLM (off the
        caller's loop), and vLLM loads the folder then and caches it."""

    def unpin(self, version, tenant: str | None = None) -> None:
        """Nothing to count: vLLM holds no slots of ours (its ``max_loras`` bounds a batch)."""

    def free(self, version) -> None:
        """Drop a freed version from vLLM, then delete its folder (``on_free``)."""
        lora_id, version.pool, version.slot = version.slot, None, None
        if lora_id is None:
            return
        self._on_free(lora_id, self.path(lora_id))
