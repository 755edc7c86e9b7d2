"""The AsyncEngineArgs fields VllmEngine starts vLLM with, from our EngineConfig and VllmBackendConfig.

Nothing here imports vllm: the caller passes whether vLLM runs on the CPU (vLLM's
``current_platform.is_cpu()``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from nlora_serve.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from nlora_serve.engine.vllm_backend.config import GiB, VllmBackendConfig, lora_rank_limit


def engine_args(cfg: EngineConfig, b: VllmBackendConfig, model_path: Path, tokenizer_path: Path,
                on_cpu: bool) -> dict:
    """AsyncEngineArgs keyword arguments (``--vllm-arg`` ones last); on the CPU also sets
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) from our KV cache size unless the environment has it, and
    everywhere ``VLLM_XGRAMMAR_CACHE_MB`` to 0 unless the environment has it (vLLM keeps the last grammar only).

    Raises:
        ValueError: ``--max-rank`` over vLLM's largest LoRA rank (:func:`lora_rank_limit`).
    """
    if on_cpu:  # vLLM-cpu sizes its KV cache from this variable (GiB), not from memory utilization
        kv_bytes = cfg.cache.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_bytes / GiB))))
    # vLLM's xgrammar compiler caches compiled grammars for all requests (by the spec's text and by
    # the grammar it parses to): a tenant could tell another's JSON schema by its shorter time to first
    # token (grammar_salt.py). At 0 MB it keeps the last one compiled only, keyed per tenant there.
    os.environ.setdefault("VLLM_XGRAMMAR_CACHE_MB", "0")
    # vLLM detokenizes what it generates: the tokenizer the front end reads prompts with (--tokenizer)
    args = dict(model=str(model_path), tokenizer=str(tokenizer_path), dtype=str(cfg.dtype).removeprefix("torch."),
                seed=cfg.seed, max_model_len=cfg.scheduler.max_model_len, max_num_seqs=cfg.scheduler.max_num_seqs,
                max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
                # unset: vLLM's default, 0 (the "fair" default is the native scheduler's; vLLM schedules fcfs)
                long_prefill_token_threshold=cfg.scheduler.long_prefill_token_threshold or 0,
                long_prefill_token_threshold_adaptive=cfg.scheduler.long_prefill_token_threshold_adaptive,
                tensor_parallel_size=b.tensor_parallel_size, pipeline_parallel_size=b.pipeline_parallel_size,
                enforce_eager=on_cpu if b.enforce_eager is None else b.enforce_eager,
                enable_lora=bool(cfg.adapter_dir), max_loras=b.max_loras,
                max_lora_rank=lora_rank_limit(cfg.adapter_limits.max_rank), disable_log_stats=True,
                enable_prefix_caching=cfg.enable_prefix_caching,
                # --load-format dummy: random weights there too (vLLM had read the folder's real
                # ones, or failed on a folder of config.json alone, the flag's use)
                load_format=cfg.load_format, generation_config=b.generation_config,
                override_generation_config=dict(b.override_generation_config))
    utilization = b.gpu_memory_utilization or (0.3 if on_cpu else None)
    if utilization is not None:
        args["gpu_memory_utilization"] = utilization
    if cfg.cache.kv_cache_memory_bytes is not None and not on_cpu:  # on the CPU: VLLM_CPU_KVCACHE_SPACE above
        args["kv_cache_memory_bytes"] = cfg.cache.kv_cache_memory_bytes
    args.update(b.engine_args)  # VllmBackendConfig refuses the keys set above (our flags own them)
    return args
