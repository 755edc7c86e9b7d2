"""The model runner at start-up: its kernels, its attention, its KV cache's size and its CUDA graphs.

:class:`nlora_serve.engine.core.EngineCore` calls :func:`build_runner` once, after the base model is
loaded and before the scheduler, the adapters and the warm-up (engine/runner/warmup.py).
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.cpu.native import NativeOps, load_native
from nlora_serve.models import BaseModel
from nlora_serve.models.base import check_max_len
from nlora_serve.models.cache import cache_root
from nlora_serve.engine.model.attention import select_attention
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.runner.memory import num_kv_blocks
from nlora_serve.engine.runner.model_runner import ModelRunner


def build_runner(config: EngineConfig, base: BaseModel, device: torch.device
                 ) -> tuple[ModelRunner, NativeOps | None, int]:
    """The model runner of ``base`` on ``device``, its KV cache allocated (and, on CUDA with Triton,
    its graphs captured); the native C ops when ``config.kernel_backend`` is "native" and they load
    (else None: :func:`load_native` warns once); and the KV cache's size in blocks.

    Raises:
        ValueError: ``max_model_len`` over the model's, a token budget the Triton kernels cannot
            index, or no room for the KV cache (memory.py), or fewer blocks than one sequence needs
            (:meth:`EngineConfig.check_capacity`).
    """
    sched, cache = config.scheduler, config.cache
    check_max_len(base, sched.max_model_len)
    if config.kernel_backend == "triton" and config.adapter_dir:
        from nlora_serve.kernels.triton_ops.launch import check_token_offsets  # imports no Triton
        check_token_offsets(sched.max_num_batched_tokens, base.spec)
    native = (load_native(cache_root(config.cache_dir) / "kernels", amx=config.cpu_amx)
              if config.kernel_backend == "native" else None)
    # no KV cache yet: num_kv_blocks sizes it below (on CUDA, from the memory the placed weights leave)
    runner = ModelRunner(base, num_blocks=None, block_size=cache.block_size,
                         max_model_len=sched.max_model_len, device=device,
                         prepack=config.kernel_backend == "native",
                         gemm=native.gemm if native is not None and config.cpu_gemm == "native" else None)
    runner.set_attention(*select_attention(config.kernel_backend, native, sched.max_model_len))
    runner.set_layer_ops(native.layer if native is not None else None)
    num_blocks = num_kv_blocks(config, runner)
    config.check_capacity(num_blocks)
    runner.allocate_kv_cache(num_blocks)
    if device.type == "cuda" and config.kernel_backend == "triton" and not config.enforce_eager:
        runner.enable_graphs(sched.max_num_seqs, capture_now=True, piecewise_tokens=(
            sched.max_num_batched_tokens if config.piecewise_graphs else 0))
    return runner, native, num_blocks
