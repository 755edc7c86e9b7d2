"""How many KV blocks the engine gets (DESIGN §5: sized like vLLM).

On the CPU the cache is ``CacheConfig.kv_cache_memory_bytes`` (or ``num_blocks``), 1 GiB by default. On
CUDA, unless one of those is given (vLLM's kv_cache_memory_bytes overrides gpu_memory_utilization), it is what
``gpu_memory_utilization`` of the GPU leaves after everything else: the weights and whatever else
is already allocated on the device (other processes included), the peak of a profiling step (a
forward at the step's full token budget, then the sampler's worst case on ``max_num_seqs`` rows of
the vocabulary, as vLLM's profile_run and _dummy_sampler_run), the CUDA graphs' pool and outputs
(captured after the cache exists, so counted here ahead of time), and room for the adapters' pools.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.engine.model.batch_info import build_batch_info
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.runner.dummy_sampler import dummy_sampler_run
from nlora_serve.engine.runner.kv_cache import kv_bytes_per_block
from nlora_serve.engine.runner.piecewise_graphs import piecewise_sizes
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


class CudaMemoryStats:
    """The device's allocator counters, as the budget reads them (a seam: the CPU tests pass a fake
    with the same methods). Bytes throughout."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        """Most bytes allocated at once since :meth:`reset_peak`."""
        return torch.cuda.max_memory_allocated(self.device)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device, other processes' use included."""
        return torch.cuda.mem_get_info(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


@dataclass(frozen=True, slots=True)
class StepProfile:
    """Peak bytes of the profiling step beyond what was held before it (its KV cache excluded)."""

    forward: int  # the forward at the full token budget, and the lm_head on the sampling rows
    step: int  # the whole step: the forward, then the sampler's worst case on those rows


@dataclass(frozen=True, slots=True)
class KvBudget:
    """How ``gpu_memory_utilization`` of the device splits; the KV cache gets :attr:`kv_bytes`."""

    total: int  # the device's bytes
    utilization: float  # EngineConfig.gpu_memory_utilization
    in_use: int  # held now: weights, the CUDA context, other processes (total - free)
    activations: int  # the step's peak (forward or sampler), in the eager allocator's blocks
    graphs: int  # the CUDA graphs' memory pool and the graphs' own outputs (0: no graphs)
    adapters: int  # the adapter pools' reserve (pool_bytes), 0 without an adapter store

    @property
    def kv_bytes(self) -> int:
        return int(self.total * self.utilization) - self.in_use - self.activations - self.graphs - self.adapters

    def describe(self) -> str:
        return (f"gpu_memory_utilization={self.utilization} of {self.total / GiB:.1f} GiB: "
                f"{self.in_use / GiB:.2f} GiB in use (weights, other processes), "
                f"{self.activations / GiB:.2f} GiB for a step's activations and sampler, "
                f"{self.graphs / GiB:.2f} GiB for CUDA graphs, {self.adapters / GiB:.2f} GiB for adapter pools, "
                f"{self.kv_bytes / GiB:.2f} GiB left for the KV cache")


def _cuda_budget(config: EngineConfig, runner, per_block: int, stats=None) -> int:
    """Bytes ``gpu_memory_utilization`` of the GPU leaves for the KV cache (at least one block), with
    the decode graphs' sink block taken out. ``stats``: the seam (default :class:`CudaMemoryStats`).

    Raises:
        ValueError: less than one block is left (the numbers are in the message).
    """
    stats = stats if stats is not None else CudaMemoryStats(runner.device)
    budget = plan_kv_budget(config, runner, stats)
    log.info("%s", budget.describe())
    usable = budget.kv_bytes - (per_block if graphs_enabled(config, runner.device) else 0)
    if usable < per_block:
        raise ValueError(
            f"no GPU memory left for the KV cache: {budget.describe()} (a step of "
            f"{config.scheduler.max_num_batched_tokens} tokens, {config.scheduler.max_num_seqs} sampling rows); "
            "raise --gpu-memory-utilization or lower --max-num-batched-tokens / --max-num-seqs")
    return usable


def plan_kv_budget(config: EngineConfig, runner, stats) -> KvBudget:
    """Profile a step (:func:`profile_step`) and split the device's memory as :class:`KvBudget`.

    The graphs' pool holds its own blocks, which the eager allocator never reuses: it is counted on
    top of the step's peak, bounded by the profiled forward (every graph runs at most the step's
    token budget, and graphs sharing the pool reuse one another's temporaries), plus what the
    graphs keep (:func:`graph_held_bytes`).
    """
    profile = profile_step(config, runner, stats)
    free, total = stats.mem_get_info()
    graphs = (profile.forward + graph_held_bytes(config, runner.spec, runner.dtype)
              if graphs_enabled(config, runner.device) else 0)
    reserve = pool_bytes(runner.spec, runner.dtype, config.adapter_limits) if config.adapter_dir else 0
    return KvBudget(total, config.gpu_memory_utilization, total - free, max(profile.forward, profile.step),
                    graphs, reserve)


def graphs_enabled(config: EngineConfig, device: torch.device) -> bool:
    """Whether the engine captures CUDA graphs (EngineCore's rule)."""
    return device.type == "cuda" and config.kernel_backend == "triton" and not config.enforce_eager


def graph_held_bytes(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes the graphs keep outside their pool: the [max_num_seqs, V] float32 logits output all of
    them share and the decode graphs' static inputs (engine/runner/cuda_graphs.py); with piecewise graphs,
    the largest bucket's static buffers (engine/runner/piecewise_graphs.py)."""
    sched = config.scheduler
    max_blocks = -(-sched.max_model_len // config.cache.block_size)
    held = sched.max_num_seqs * (spec.vocab_size * 4 + 5 * 8 + max_blocks * 4)
    if config.piecewise_graphs:
        itemsize = torch.empty((), dtype=dtype).element_size()
        heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        per_token = 3 * 8 + 2 * hd * 4 + spec.hidden_size * 4 + (2 * heads + kv_heads) * hd * itemsize
        held += piecewise_sizes(sched.max_num_batched_tokens)[-1] * per_token
    return held


@torch.inference_mode()
def profile_step(config: EngineConfig, runner, stats) -> StepProfile:
    """Peak bytes of the largest step, beyond what is held before it (vLLM's profile_run with its
    dummy sampler run): a prefill of ``min(max_num_batched_tokens, max_model_len)`` tokens over a
    cache of just enough blocks, the lm_head on ``min(max_num_seqs, tokens)`` rows, then
    :func:`~nlora_serve.engine.runner.dummy_sampler.dummy_sampler_run` on those logits (every sampling
    option at once, the grammar bitmask included). The cache and every tensor are freed again.
    """
    sched, block_size = config.scheduler, config.cache.block_size
    tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
    num_blocks = -(-tokens // block_size)
    stats.synchronize()
    kv = runner.allocate_kv_cache(num_blocks)
    before = stats.allocated()  # after the profile's own cache: the budget counts the real one
    stats.reset_peak()
    info = build_batch_info([tokens], [tokens], [list(range(num_blocks))], [True], block_size).to(runner.device)
    ids = torch.zeros(tokens, dtype=torch.long, device=runner.device)
    positions = torch.arange(tokens, device=runner.device)
    hidden = runner.model.hidden(ids, positions, kv, info)
    logits = runner.model.logits(hidden, torch.arange(min(sched.max_num_seqs, tokens), device=runner.device))
    del hidden  # a step's hidden states are gone by the time it samples
    stats.synchronize()
    forward = stats.peak() - before
    dummy_sampler_run(logits, torch.Generator(runner.device).manual_seed(0), grammar_mask=True)
    stats.synchronize()
    step = stats.peak() - before
    runner.kv_cache = None
    del kv, logits
    stats.empty_cache()
    return StepProfile(forward, step)


def pool_bytes(spec: ModelSpec, dtype: torch.dtype, limits: AdapterLimits) -> int:
    """Device bytes the adapter pools may take: the tied budget plus a full LoRA pool
    (``max_loras`` slots of A [R, in], N [R, R], B [out, R] at every site, R = max_rank)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    r = limits.max_rank
    per_layer = sum(r * (inp + out + r) for out, inp in map(spec.projection_shape, PROJECTIONS))
    return limits.adapter_memory + limits.max_loras * spec.num_layers * per_layer * itemsize
