"""Engine configuration: one slotted dataclass per concern, validated in ``__post_init__``.

The CLI and the gRPC server only fill these in; nothing below reads environment variables.
torch is imported where a value needs it, not with the module: the ``serve`` and ``generate`` flags
print these defaults in their ``--help`` without loading torch (seconds on a small CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from nlora_serve.adapters.limits import AdapterLimits

if TYPE_CHECKING:
    import torch


KERNEL_BACKENDS = ("auto", "native", "torch", "triton")
CPU_GEMMS = ("native", "onednn")


def resolve_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda|cuda:N`` -> a torch device (``auto``: CUDA when torch sees a GPU).

    Raises:
        ValueError: an unknown name, or CUDA asked for where torch sees no GPU.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    return device


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive integer; got {value!r}")


SCHEDULING_POLICIES = ("fcfs", "fair")
# the long-prefill cap of "fair" on the CPU when --long-prefill-token-threshold is not given, applied
# while requests of more than one tenant run or wait (scheduler.py; bench/RESULTS.md, "Long prompts
# against another tenant's stream"). Not on CUDA: unmeasured there, and a GPU's prefill is
# efficient well above 128 tokens a step
FAIR_LONG_PREFILL_TOKEN_THRESHOLD = 128
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # the CPU's KV cache without --kv-cache-memory-bytes
# the longest an engine step may run, seconds, without --engine-step-timeout (engine/step_watchdog.py).
# CUDA: vLLM's execute_model timeout (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS); a first-use Triton compile
# inside a step takes seconds to a minute. CPU: the default model's worst step on a busy 2-core box
# was 15 s (fp32, a 2048-token prefill chunk after 2048 tokens of context); a 7B model's 2048-token
# prefill at ~100 GFLOP/s is ~5 min: 30 min leaves room for bigger models, longer contexts and
# slower CPUs, and still ends a hang
DEFAULT_STEP_TIMEOUT_S = {"cpu": 1800.0, "cuda": 300.0}


# A tenant's fair-scheduling weight, bounded so that shares and service counters stay finite and
# meaningful: two tenants at 1e308 summed to inf (every share NaN), one at 5e-324 had a queue share
# of ~7e-323 requests. The bounds allow a 10^6 ratio between the heaviest and the lightest tenant.
MIN_TENANT_WEIGHT, MAX_TENANT_WEIGHT = 1e-3, 1e3
TENANT_WEIGHT_RULE = f"a positive number from {MIN_TENANT_WEIGHT:g} to {MAX_TENANT_WEIGHT:g} (default 1)"


def is_tenant_weight(weight: object) -> bool:
    """Whether ``weight`` is a valid tenant weight: an int or float (not bool) in
    [MIN_TENANT_WEIGHT, MAX_TENANT_WEIGHT]."""
    return (not isinstance(weight, bool) and isinstance(weight, int | float)
            and MIN_TENANT_WEIGHT <= weight <= MAX_TENANT_WEIGHT)


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits (DESIGN §5)."""

    max_num_seqs: int = 64  # most sequences running (holding KV blocks) at once
    max_num_batched_tokens: int = 2048  # per-step token budget: decode tokens + prefill chunk tokens
    max_model_len: int = 2048  # prompt + generated tokens of one sequence, at most
    # admission order of waiting requests: "fcfs" (arrival) or "fair" (VTC across tenants, fairness.py)
    policy: str = "fcfs"
    tenant_weights: dict[str, float] = field(default_factory=dict)  # "fair": tenant -> weight (absent: 1)
    # a prefill with more than this many tokens left is "long" and computes at most this many per
    # step while other requests run or wait, so decodes and short prompts interleave with it
    # (vLLM's --long-prefill-token-threshold; 0: no cap, vLLM's default). None (not given): no cap
    # under "fcfs"; under "fair" FAIR_LONG_PREFILL_TOKEN_THRESHOLD while requests of more than one
    # tenant run or wait, so one tenant's long prompts cannot stall another's stream (the CPU's:
    # EngineConfig makes None 0 on CUDA)
    long_prefill_token_threshold: int | None = None
    # floor that cap at max_num_batched_tokens // (running + waiting requests) (vLLM's
    # --long-prefill-token-threshold-adaptive)
    long_prefill_token_threshold_adaptive: bool = False

    def __post_init__(self) -> None:
        _positive("SchedulerConfig", max_num_seqs=self.max_num_seqs,
                  max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len)
        if self.max_model_len < 2:  # below it no request fits: a prompt is >= 1 token, and one is generated
            raise ValueError(f"SchedulerConfig.max_model_len must be >= 2 (one prompt token and one generated "
                             f"token); got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence must be able to decode one token in every step
            raise ValueError(f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= SchedulerConfig.max_num_seqs ({self.max_num_seqs})")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"SchedulerConfig.policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.policy!r}")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)
                                      or not 0 <= threshold <= self.max_model_len):
            raise ValueError("SchedulerConfig.long_prefill_token_threshold (--long-prefill-token-threshold) must be "
                             f"an integer from 0 (off) to max_model_len ({self.max_model_len}); got {threshold!r}")
        if not isinstance(self.long_prefill_token_threshold_adaptive, bool):
            raise ValueError("SchedulerConfig.long_prefill_token_threshold_adaptive "
                             "(--long-prefill-token-threshold-adaptive) must be True or False; "
                             f"got {self.long_prefill_token_threshold_adaptive!r}")
        for tenant, weight in self.tenant_weights.items():
            if not is_tenant_weight(weight):
                raise ValueError(f"SchedulerConfig.tenant_weights[{tenant!r}] must be {TENANT_WEIGHT_RULE}; got {weight!r}")


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache size: ``num_blocks`` blocks of ``block_size`` tokens each, for all layers."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as fit in ``kv_cache_memory_bytes``
    # bytes, K and V, all layers (--kv-cache-memory-bytes, vLLM's kv_cache_memory_bytes); used only when
    # num_blocks is None. None: DEFAULT_CPU_KV_CACHE_BYTES on the CPU, what gpu_memory_utilization leaves on CUDA
    kv_cache_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        _positive("CacheConfig", block_size=self.block_size)
        if self.kv_cache_memory_bytes is not None:
            _positive("CacheConfig", kv_cache_memory_bytes=self.kv_cache_memory_bytes)
        if self.num_blocks is not None:
            _positive("CacheConfig", num_blocks=self.num_blocks)

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """Number of blocks: ``num_blocks`` or ``kv_cache_memory_bytes // bytes_per_block`` (the CPU's default
        when ``kv_cache_memory_bytes`` is None)."""
        if self.num_blocks is not None:
            return self.num_blocks
        return max(1, (self.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES) // bytes_per_block)


@dataclass(slots=True)
class EngineConfig:
    """Everything the native engine needs to start.

    Raises (in ``__post_init__``):
        ValueError: a field is out of range; the message names the field and the value.
    """

    model: str = "default"  # "default", a Hugging Face model directory, or a .gguf file
    # compute dtype of weights, activations and KV cache: torch.float32 or torch.bfloat16 (None: float32)
    dtype: torch.dtype | None = None
    cache_dir: str | None = None  # prepared-model cache root (None: $NLORA_SERVE_CACHE / XDG)
    seed: int = 0  # seeds the generator of requests that sample without their own seed
    # continuous batching limits: running sequences, tokens per step, max_model_len, policy
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # the paged KV cache: tokens per block, and its size in blocks or bytes
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter_dir: str | None = None  # the adapter store (--adapter-dir); None: no adapters served
    # what adapters the server takes and holds: max rank, resident untied adapters, tied tenants'
    # bytes, a store version's bytes (adapters/runtime/manager.py)
    adapter_limits: AdapterLimits = field(default_factory=AdapterLimits)
    # "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" or "cuda:N": where the
    # weights, the KV cache, the activations and sampling live
    device: str = "auto"
    # which ops run attention and the adapters: "auto" = "triton" on CUDA, "native" on the CPU;
    # "native" = the C ops (kernels/cpu/native.py, compiled once into <cache root>/kernels; the torch
    # path where no C compiler is found); "torch" = plain torch ops; "triton" = the Triton kernels
    # (on CPU tensors only under TRITON_INTERPRET=1: that is how CI runs the CUDA path)
    kernel_backend: str = "auto"
    tokenizer: str | None = None  # a tokenizer directory (None: the model's own)
    # whose generation config gives the EOS ids beyond the tokenizer's (engine/eos.py): "auto" and
    # "vllm" the model folder's, else a folder's (vLLM's --generation-config; the sampling defaults
    # it also names are the front end's, serving/generation_config.py)
    generation_config: str = "auto"
    # "auto": the weights in the model directory; "dummy": random weights from config.json alone
    # (vLLM's --load-format dummy), for shapes with no shipped weights
    load_format: str = "auto"
    # CUDA: share of the GPU's memory the engine may use; the KV cache gets what is left of it
    # after the weights, the adapters' pools and a profiling forward at the step's token budget
    gpu_memory_utilization: float = 0.9
    # share full KV blocks between requests with the same prefix, adapter version and cache salt
    # (prefix_cache.py); False: every request computes its whole prompt (--no-enable-prefix-caching)
    enable_prefix_caching: bool = True
    # CUDA + Triton: decode steps replay CUDA graphs (engine/runner/cuda_graphs.py); True runs every step
    # eagerly (vLLM's --enforce-eager)
    enforce_eager: bool = False
    # CUDA + Triton, graphs on: prefill and mixed steps of up to 2048 tokens replay piecewise CUDA
    # graphs around eager attention (engine/runner/piecewise_graphs.py). Off by default until an H200 run
    # confirms the gain (bench/gpu_check.sh step piecewise_256); --piecewise-graphs turns it on
    piecewise_graphs: bool = False
    # schedule and launch step n+1 while the device runs step n, reading step n's tokens back after
    # (core.py EngineCore.step; vLLM's --async-scheduling); None: on for CUDA, off on the CPU (where
    # nothing runs in the background, so it only adds a step of latency to every stop)
    async_scheduling: bool | None = None
    # torch threads of the step thread, the only thread of a serving process that runs torch in
    # parallel (engine/threads.py says why); None: the count the process's main thread had
    cpu_threads: int | None = None
    # kernel_backend "native": the base GEMMs on weights packed for our GEMM (kernels/cpu/gemm.py,
    # where the CPU runs the dtype) or, "onednn", for oneDNN's prepacked GEMMs
    cpu_gemm: str = "native"
    # kernel_backend "native", bf16: the adapter products on AMX tiles where the CPU has them;
    # False keeps the AVX-512 paths (kernels/cpu/native.py)
    cpu_amx: bool = True
    # the longest one engine step may run, seconds, before the engine is declared dead (hung: health
    # 503, drain, exit 1; engine/step_watchdog.py); 0: no limit; None: DEFAULT_STEP_TIMEOUT_S by device
    step_timeout_s: float | None = None

    def __post_init__(self) -> None:
        import torch

        if self.dtype is None:
            self.dtype = torch.float32
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"EngineConfig.dtype must be torch.float32 or torch.bfloat16; got {self.dtype}")
        if not isinstance(self.seed, int):
            raise ValueError(f"EngineConfig.seed must be an integer; got {self.seed!r}")
        if not isinstance(self.piecewise_graphs, bool):
            raise ValueError(f"EngineConfig.piecewise_graphs must be True or False; got {self.piecewise_graphs!r}")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise ValueError(f"EngineConfig.cpu_threads must be a positive integer or None; got {self.cpu_threads!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching must be True or False; got {self.enable_prefix_caching!r}")
        self.device = str(resolve_device(self.device))
        if self.scheduler.long_prefill_token_threshold is None and self.device != "cpu":
            # "fair"'s default long-prefill cap is the CPU's (FAIR_LONG_PREFILL_TOKEN_THRESHOLD): a copy,
            # not the caller's config changed
            self.scheduler = replace(self.scheduler, long_prefill_token_threshold=0)
        timeout = self.step_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not 0 <= timeout < float("inf")):
            raise ValueError("EngineConfig.step_timeout_s (--engine-step-timeout) must be a number of seconds >= 0 "
                             f"(0: no limit) or None; got {timeout!r}")
        if timeout is None:
            self.step_timeout_s = DEFAULT_STEP_TIMEOUT_S["cpu" if self.device == "cpu" else "cuda"]
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError("EngineConfig.async_scheduling must be True, False or None; "
                             f"got {self.async_scheduling!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"EngineConfig.kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}; "
                             f"got {self.kernel_backend!r}")
        if self.kernel_backend == "auto":
            self.kernel_backend = "triton" if self.device.startswith("cuda") else "native"
        if self.kernel_backend == "native" and self.device != "cpu":
            raise ValueError(f"EngineConfig.kernel_backend 'native' runs on the CPU only; device is {self.device}")
        if self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(f"EngineConfig.cpu_gemm must be one of {', '.join(CPU_GEMMS)}; got {self.cpu_gemm!r}")
        if not isinstance(self.cpu_amx, bool):
            raise ValueError(f"EngineConfig.cpu_amx must be True or False; got {self.cpu_amx!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError("EngineConfig.generation_config must be 'auto', 'vllm' or a folder; "
                             f"got {self.generation_config!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"EngineConfig.load_format must be 'auto' or 'dummy'; got {self.load_format!r}")
        if isinstance(self.gpu_memory_utilization, bool) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("EngineConfig.gpu_memory_utilization must be a float in (0, 1]; "
                             f"got {self.gpu_memory_utilization!r}")

    def check_capacity(self, num_blocks: int) -> None:
        """Refuse a cache that cannot hold one sequence of ``max_model_len`` tokens.

        Without this a lone long sequence could wait forever for blocks that never free up.

        Raises:
            ValueError: the numbers involved are in the message.
        """
        need = -(-self.scheduler.max_model_len // self.cache.block_size)
        if num_blocks < need:
            raise ValueError(f"KV cache of {num_blocks} blocks x {self.cache.block_size} tokens cannot hold "
                             f"one sequence of max_model_len={self.scheduler.max_model_len} tokens "
                             f"({need} blocks); lower --max-model-len or raise --kv-cache-memory-bytes")
