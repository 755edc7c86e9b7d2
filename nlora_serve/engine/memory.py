"""How many KV blocks the engine gets (DESIGN §5: sized like vLLM).

On the CPU the cache is ``CacheConfig.kv_cache_memory_bytes`` (or ``num_blocks``), 1 GiB by default. On
CUDA, unless one of those is given (vLLM's kv_cache_memory_bytes overrides gpu_memory_utilization), it is what
``gpu_memory_utilization`` of the GPU leaves after everything else: the weights and whatever else
is already allocated on the device (other processes included), the activations of a profiling
forward at the step's full token budget, and room for the adapters' pools.
"""

from __future__ import annotations

import logging

import torch

from nlora_serve.adapters.manager import AdapterLimits
from nlora_serve.engine.batch_info import build_batch_info
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.kv_cache import kv_bytes_per_block
from nlora_serve.models import PROJECTIONS, ModelSpec

GiB = 1 << 30
log = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, runner) -> int:
    """Blocks for ``runner``'s KV cache (its model already on the device, no cache yet); logs what
    they hold (:func:`kv_cache_summary`), as vLLM logs its KV cache size and maximum concurrency.

    Raises:
        ValueError: on CUDA, when nothing is left for the cache (the numbers are in the message).
    """
    cache = config.cache
    per_block = kv_bytes_per_block(runner.spec, cache.block_size, runner.dtype)
    if cache.num_blocks is not None or cache.kv_cache_memory_bytes is not None or runner.device.type != "cuda":
        num_blocks = cache.resolve_num_blocks(per_block)
    else:
        num_blocks = _cuda_budget(config, runner, per_block) // per_block
    log.info("%s", kv_cache_summary(num_blocks, per_block, cache.block_size, config.scheduler.max_model_len))
    return num_blocks


def kv_cache_summary(num_blocks: int, bytes_per_block: int, block_size: int, max_model_len: int) -> str:
    """One line for the start-up log: the cache's blocks, tokens and GiB, and how many requests of
    ``max_model_len`` tokens fit at once (vLLM's "Maximum concurrency"); the flag that sizes it."""
    tokens = num_blocks * block_size
    return (f"KV cache: {num_blocks} blocks of {block_size} tokens = {tokens} tokens, "
            f"{num_blocks * bytes_per_block / GiB:.2f} GiB; {tokens / max_model_len:.1f} requests of --max-model-len "
            f"{max_model_len} tokens at once (--kv-cache-memory-bytes sizes it)")


def _cuda_budget(config: EngineConfig, runner, per_block: int) -> int:
    """Bytes ``gpu_memory_utilization`` of the GPU leaves for the KV cache (at least one block).

    Raises:
        ValueError: less than one block is left (the numbers are in the message).
    """
    spec, dtype = runner.spec, runner.dtype
    peak_activations = profile_forward(config, runner)
    free, total = torch.cuda.mem_get_info(runner.device)
    reserve = pool_bytes(spec, dtype, config.adapter_limits) if config.adapter_dir else 0
    budget = int(total * config.gpu_memory_utilization) - (total - free) - peak_activations - reserve
    if budget < per_block:
        raise ValueError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization={config.gpu_memory_utilization} of "
            f"{total / GiB:.1f} GiB, {(total - free) / GiB:.1f} GiB in use (weights, other processes), "
            f"{peak_activations / GiB:.2f} GiB for a step of {config.scheduler.max_num_batched_tokens} tokens, "
            f"{reserve / GiB:.2f} GiB for adapter pools; raise --gpu-memory-utilization or lower "
            "--max-num-batched-tokens")
    return budget


@torch.inference_mode()
def profile_forward(config: EngineConfig, runner) -> int:
    """Peak bytes a forward of the step's whole token budget allocates beyond what is held now.

    Runs one prefill of ``min(max_num_batched_tokens, max_model_len)`` tokens over a cache of
    just enough blocks, which is freed again.
    """
    sched, block_size = config.scheduler, config.cache.block_size
    tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
    num_blocks = -(-tokens // block_size)
    torch.cuda.synchronize(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    kv = runner.allocate_kv_cache(num_blocks)
    info = build_batch_info([tokens], [tokens], [list(range(num_blocks))], [True], block_size).to(runner.device)
    ids = torch.zeros(tokens, dtype=torch.long, device=runner.device)
    positions = torch.arange(tokens, device=runner.device)
    runner.model(ids, positions, kv, info)
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - before
    runner.kv_cache = None
    del kv
    torch.cuda.empty_cache()
    return peak


def pool_bytes(spec: ModelSpec, dtype: torch.dtype, limits: AdapterLimits) -> int:
    """Device bytes the adapter pools may take: the tied budget plus a full LoRA pool
    (``max_loras`` slots of A [R, in], N [R, R], B [out, R] at every site, R = max_rank)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    r = limits.max_rank
    per_layer = sum(r * (inp + out + r) for out, inp in map(spec.projection_shape, PROJECTIONS))
    return limits.adapter_memory + limits.max_loras * spec.num_layers * per_layer * itemsize
