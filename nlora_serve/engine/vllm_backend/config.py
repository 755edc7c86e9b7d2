"""The vLLM backend's configuration and the small translations between vLLM's types and ours.

Nothing here imports vllm at module level: the project's venv never needs it (DESIGN §8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.engine.vllm_backend.grammar_salt import salted_fields

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
GiB = 1 << 30
# fold folders on disk per LoRA vLLM caches on its CPU (max_cpu_loras): vLLM re-reads a folder only
# when it loads that LoRA again, and a version beyond is folded again
FOLD_FOLDERS_PER_CPU_LORA = 4
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # vLLM's finish reasons as ours; else "error"
# AsyncEngineArgs fields the backend sets from our own flags: a --vllm-arg for one of them would
# silently override what the front end believes (a max_lora_rank under --max-rank passed adapters
# that then killed vLLM's engine on their first request; a smaller max_model_len turned a too-long
# prompt's 400 into a 500), so it is refused, naming the flag to use instead
OWNED_ENGINE_ARGS = {
    "model": "--model", "tokenizer": "--tokenizer", "dtype": "--dtype", "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens",
    "long_prefill_token_threshold": "--long-prefill-token-threshold",
    "long_prefill_token_threshold_adaptive": "--long-prefill-token-threshold-adaptive",
    "tensor_parallel_size": "--tensor-parallel-size", "pipeline_parallel_size": "--pipeline-parallel-size",
    "enable_lora": "--adapter-dir (LoRA is on with an adapter store)", "max_loras": "--max-loras",
    "max_lora_rank": "--max-rank", "kv_cache_memory_bytes": "--kv-cache-memory-bytes",
    "enable_prefix_caching": "--enable-prefix-caching / --no-enable-prefix-caching",
    "generation_config": "--generation-config", "override_generation_config": "--override-generation-config",
}
# AsyncEngineArgs fields that would make vLLM serve other weights, modules or a tokenizer than the
# ones the front end read and validated every adapter against (lora_target_modules=["q_proj"]
# applied only q_proj of every adapter, silently): refused outright
FOREIGN_ENGINE_ARGS = ("lora_target_modules", "hf_overrides", "hf_config_path", "model_weights", "revision",
                       "code_revision", "tokenizer_revision", "load_format", "skip_tokenizer_init", "tokens_only",
                       "tokenizer_mode", "quantization_config", "lora_dtype")


@dataclass(slots=True)
class VllmBackendConfig:
    """What only the vLLM backend needs; the rest comes from :class:`EngineConfig`.

    Raises (in ``__post_init__``):
        ValueError: a field out of range (the message names it).
    """

    tensor_parallel_size: int = 1  # --tensor-parallel-size: GPUs each layer is split over
    pipeline_parallel_size: int = 1  # --pipeline-parallel-size: stages the layers are split into
    max_loras: int = 8  # distinct adapters in one batch (vLLM max_loras)
    # --gpu-memory-utilization; None: 0.3 on the CPU (host memory), vLLM's default on GPUs
    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None  # None: eager on the CPU (no compile step), CUDA graphs on GPUs
    engine_args: dict = field(default_factory=dict)  # --vllm-arg KEY=VALUE: any other AsyncEngineArgs field
    # --max-fold-folders: fold folders on disk at most, in use or idle (each version's is written on
    # its first request; one more waits for an idle one to go); None: FOLD_FOLDERS_PER_CPU_LORA x
    # vLLM's max_cpu_loras
    max_fold_folders: int | None = None
    # --generation-config ("auto", "vllm" or an absolute folder) and --override-generation-config, as
    # vLLM's own: the front end applies the sampling defaults (serving/generation_config.py); vLLM's
    # model config then reads the same generation config (its EOS ids among them)
    generation_config: str = "auto"
    override_generation_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_loras"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VllmBackendConfig.{name} must be a positive integer; got {value!r}")
        if self.max_fold_folders is not None and (not isinstance(self.max_fold_folders, int)
                                                  or self.max_fold_folders <= 0):
            raise ValueError(f"VllmBackendConfig.max_fold_folders must be a positive integer; got "
                             f"{self.max_fold_folders!r}")
        for key in self.engine_args:
            if key in OWNED_ENGINE_ARGS:
                raise ValueError(f"--vllm-arg {key}: the backend sets it from {OWNED_ENGINE_ARGS[key]}; use that")
            if key in FOREIGN_ENGINE_ARGS:
                raise ValueError(f"--vllm-arg {key}: would make vLLM serve other weights, adapted modules or "
                                 "tokenizer than the ones every adapter is validated against; not supported")
        if self.gpu_memory_utilization is not None and "gpu_memory_utilization" in self.engine_args:
            raise ValueError("--gpu-memory-utilization and --vllm-arg gpu_memory_utilization: give one")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("VllmBackendConfig.gpu_memory_utilization must be in (0, 1]; got "
                             f"{self.gpu_memory_utilization!r}")


def lora_rank_limit(max_rank: int) -> int:
    """vLLM's ``max_lora_rank``: the smallest value it accepts that covers our ``--max-rank``.

    Raises:
        ValueError: ``max_rank`` over vLLM's largest (512): an adapter of a rank between would pass
            our registration and then kill vLLM's engine core on its first request.
    """
    if max_rank > MAX_LORA_RANKS[-1]:
        raise ValueError(f"--max-rank {max_rank}: the vLLM backend serves LoRA ranks up to {MAX_LORA_RANKS[-1]} "
                         "(vLLM's largest max_lora_rank)")
    return next(r for r in MAX_LORA_RANKS if r >= max_rank)


class SchedulerSnapshot:
    """A vLLM stat logger that keeps the last scheduler snapshot (our gauges read it) and counts
    preemptions."""

    def __init__(self) -> None:
        self.running = self.waiting = self.steps = self.preemptions = 0
        self.kv_usage = 0.0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    # vLLM counts apart the waiting requests it skips for now (deferred: e.g. no LoRA
                    # slot free for their adapter); waiting they are, as vLLM's own gauge counts them
                    stats.running = scheduler_stats.num_running_reqs
                    stats.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    stats.kv_usage = scheduler_stats.kv_cache_usage
                    stats.steps += 1
                if iteration_stats is not None:
                    stats.preemptions += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self):
                pass

        return Logger(vllm_config, engine_index)


def vllm_sampling_params(p: SamplingParams, tenant: str | None = None):
    """Our SamplingParams as vLLM's, streaming deltas (same meanings: DESIGN §5); ``tenant``: who sent
    the request (its structured-output spec gets a key of its own in vLLM's grammar cache)."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    return VllmSamplingParams(max_tokens=p.max_tokens, min_tokens=p.min_tokens,
                              temperature=0.0 if p.greedy else p.temperature, top_k=p.top_k, top_p=p.top_p,
                              min_p=p.min_p,
                              seed=p.seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
                              include_stop_str_in_output=p.include_stop_str_in_output,
                              ignore_eos=p.ignore_eos, repetition_penalty=p.repetition_penalty,
                              presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                              logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
                              logprob_token_ids=list(p.logprob_token_ids) if p.logprob_token_ids else None,
                              logit_bias=dict(p.logit_bias) or None,
                              skip_special_tokens=p.skip_special_tokens,
                              spaces_between_special_tokens=p.spaces_between_special_tokens,
                              allowed_token_ids=list(p.allowed_token_ids) if p.allowed_token_ids else None,
                              bad_words=list(p.bad_words) or None,
                              structured_outputs=vllm_structured(p.structured_outputs, tenant),
                              output_kind=RequestOutputKind.DELTA)


def vllm_structured(spec: StructuredOutputs | None, tenant: str | None = None):
    """Our StructuredOutputs as vLLM's StructuredOutputsParams (None stays None), keyed in vLLM's
    grammar cache for ``tenant`` by a prefix that changes nothing the grammar accepts (grammar_salt.py)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**salted_fields(spec, tenant))


def refusal_line(exc: ValidationError) -> str:
    """One line for vLLM's refusal of an engine-argument value: vLLM's configs are pydantic models,
    whose message is a multi-line report with a link per field. E.g.
    ``gpu_memory_utilization='lots': Input should be a valid number, ... (CacheConfig)``."""
    fields = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'value'}={e.get('input')!r}: {e['msg']}"
                       for e in exc.errors())
    return f"{fields} ({exc.title})"
