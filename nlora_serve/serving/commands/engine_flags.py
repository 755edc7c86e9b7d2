"""Device and engine-size flags shared by ``serve`` and ``generate`` (vLLM's spellings); torch loads
only when :func:`device_config` runs, not for ``--help`` nor for :func:`engine_sizes`' checks."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

from nlora_serve.arg_types import check_dtype, human_readable_int
from nlora_serve.engine.config import (CPU_GEMMS, DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_STEP_TIMEOUT_S,
                                       FAIR_LONG_PREFILL_TOKEN_THRESHOLD, CacheConfig, EngineConfig, SchedulerConfig,
                                       resolve_device)


# a config dataclass's field as its __post_init__ names it: "ServerConfig.max_queue must be ..."
_CONFIG_FIELD = re.compile(r"\b(?:ServerConfig|SchedulerConfig|CacheConfig|AdapterLimits|EngineConfig|"
                           r"VllmBackendConfig|SamplingParams)\.(\w+)")


def in_flag_words(message: str, args: argparse.Namespace) -> str:
    """A config's ValueError message in the words of the flags that set it, for the user who typed
    them, not the class that checked them: ``ServerConfig.max_queue must be a positive integer; got 0``
    becomes ``--max-queue 0: must be a positive integer; got 0``, ``ServerConfig.host='::1x' is not a
    loopback address ...`` becomes ``--host ::1x: not a loopback address ...``, and another field it
    names becomes that field's flag. A message that names no flag's field is returned as it is."""
    match = _CONFIG_FIELD.search(message)
    if match is None or not hasattr(args, match.group(1)):
        return message
    dest = match.group(1)
    rest = message
    if match.start() == 0:  # the subject is the flag the prefix names: "must be ...", "not a ..."
        rest = re.sub(r"^is ", "", re.sub(r"^(?:=\S+|\s*\([^)]*\))?\s*", "", message[match.end():]))
    rest = _CONFIG_FIELD.sub(lambda m: _flag(m.group(1)) if hasattr(args, m.group(1)) else m.group(0), rest)
    return f"{_flag(dest)} {getattr(args, dest)}: {rest}"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def flag_groups(parser: argparse.ArgumentParser, specs: Mapping[str, tuple[str, str]]) -> dict[str, object]:
    """``--help``'s groups of a command's flags, by concern as vLLM's ``serve --help`` groups them:
    ``specs`` maps a key to a group's (title, one-line description), in the order ``--help`` lists
    them; returns key -> argparse argument group (its ``add_argument`` adds to the parser)."""
    return {key: parser.add_argument_group(title, description) for key, (title, description) in specs.items()}


def group_adders(parser: argparse.ArgumentParser, groups: Mapping[str, object] | None, *keys: str) -> list:
    """The ``add_argument`` of each group ``keys`` name in ``groups``, the parser's own where none
    (a bare parser, as tests build)."""
    return [(parser if groups is None or key not in groups else groups[key]).add_argument for key in keys]


def add_device_arguments(parser: argparse.ArgumentParser, groups: Mapping[str, object] | None = None) -> None:
    """``--device``, ``--load-format``, ``--tokenizer``, ``--gpu-memory-utilization``, the CUDA graph
    flags, ``--cpu-gemm`` / ``--cpu-amx``, ``--engine-step-timeout`` and the scheduler's sizes; in
    ``groups``' "model", "device", "cache" and "scheduler" groups (:func:`flag_groups`) where given."""
    d = EngineConfig.__dataclass_fields__
    m, e, c, s = group_adders(parser, groups, "model", "device", "cache", "scheduler")  # e: the engine's device
    # default None for the native engine's own flags: serve --backend vllm refuses them only when given
    e("--device", default=None, help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N: where "
                                     "weights, KV cache, activations and sampling live (default: auto)")
    m("--load-format", choices=["auto", "dummy"], default="auto",
      help="auto: the model's weights; dummy: random weights from its config.json alone, to serve and measure "
           "shapes whose weights are not here (default: %(default)s)")
    m("--tokenizer", default=None, help="tokenizer directory, when the model directory has none (e.g. with "
                                        "--load-format dummy)")
    # default None: serve --backend vllm passes the flag on only when given (else vLLM's own default)
    c("--gpu-memory-utilization", type=float, default=None,
      help="CUDA: share of the GPU's memory the engine may use; the KV cache gets what the weights, adapter "
           f"pools and a profiling forward leave (default: {d['gpu_memory_utilization'].default}; for serve "
           "--backend vllm, vLLM's gpu_memory_utilization, default: vLLM's on GPUs, 0.3 of host memory on the CPU)")
    c("--kv-cache-memory-bytes", type=human_readable_int, default=None, metavar="BYTES",
      help="the KV cache's size in bytes (vLLM's flag; it sets how many tokens the running requests hold "
           f"at once; the start-up log prints that count) (default: {DEFAULT_CPU_KV_CACHE_BYTES} on the CPU; on "
           "CUDA what --gpu-memory-utilization leaves, which this overrides)")
    e("--enforce-eager", action="store_true",
      help="CUDA: run every step eagerly (no CUDA graphs at all; for serve --backend vllm, vLLM's "
           "enforce_eager)")
    e("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=None,
      help="CUDA: also replay prefill and mixed steps as piecewise CUDA graphs around eager attention "
           "(off by default until measured on a GPU; --enforce-eager wins)")
    s("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
      help="schedule step n+1 while the device runs step n, reading step n's tokens back after "
           "(default: on for CUDA, off on the CPU)")
    e("--cpu-gemm", choices=CPU_GEMMS, default=None,
      help="CPU: the base GEMMs on our packed-panel kernel (native) or oneDNN's prepacked ones (onednn), "
           f"e.g. to rule ours out when something looks wrong (default: {d['cpu_gemm'].default})")
    e("--cpu-amx", action=argparse.BooleanOptionalAction, default=None,
      help="CPU, bf16: the adapter products on AMX tiles where the CPU has AMX-BF16; --no-cpu-amx keeps "
           "AVX-512 (default: on)")
    # generate's engine is native: the reason of a hung step, which names this flag, is its error line
    e("--engine-step-timeout", type=float, default=None, metavar="SECONDS",
      help="native engine: the longest one engine step may run; past it the engine counts as hung (a "
           "deadlocked kernel, a stuck op): serve's /health turns 503, the requests it held are aborted (each "
           "told the engine failed) and the server exits 1, without a drain, for its supervisor to restart it "
           "(vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS), generate ends with an error (exit 2); 0: no limit (default: "
           f"{DEFAULT_STEP_TIMEOUT_S['cpu']:g} on the CPU, {DEFAULT_STEP_TIMEOUT_S['cuda']:g} on CUDA)")
    s("--max-num-seqs", type=int, default=SchedulerConfig().max_num_seqs,
      help="sequences running at once, at most (default: %(default)s)")
    s("--max-num-batched-tokens", type=human_readable_int, default=SchedulerConfig().max_num_batched_tokens,
      help="tokens one step computes, decodes and prefill chunks together (default: %(default)s)")
    s("--long-prefill-token-threshold", type=int, default=None,
      metavar="N", help="a prefill with more than N tokens left computes N per step while other requests run or "
                        "wait, so one tenant's long prompts cannot stall the others' decodes (vLLM's flag; "
                        "0: off) (default: 0 (off, vLLM's) under --scheduling-policy fcfs and on CUDA; under "
                        f"fair on the CPU {FAIR_LONG_PREFILL_TOKEN_THRESHOLD} while requests of more than one "
                        "tenant run or wait)")
    s("--long-prefill-token-threshold-adaptive", action="store_true",
      help="floor that cap at --max-num-batched-tokens / (running + waiting requests) (vLLM's flag)")


def engine_sizes(args: argparse.Namespace, **scheduler_fields) -> tuple[SchedulerConfig, CacheConfig]:
    """The scheduler's and the KV cache's configs from the size flags (``--max-num-seqs``,
    ``--max-num-batched-tokens``, ``--max-model-len``, the long-prefill flags, ``--kv-cache-memory-bytes``;
    ``scheduler_fields`` beside them), and ``--dtype``'s name checked: the engine flags that need no
    torch, so that ``serve`` and ``generate`` refuse them before the engine's imports (seconds).

    Raises:
        ValueError: a flag out of range (the message names the config field, or ``--dtype``).
    """
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len,
                                long_prefill_token_threshold=args.long_prefill_token_threshold,
                                long_prefill_token_threshold_adaptive=args.long_prefill_token_threshold_adaptive,
                                **scheduler_fields)
    cache = CacheConfig(kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    check_dtype(args.dtype)
    return scheduler, cache


def device_config(args: argparse.Namespace, sizes: tuple[SchedulerConfig, CacheConfig] | None = None,
                  **fields) -> EngineConfig:
    """An EngineConfig from the device flags, ``--model``, ``--dtype``, ``sizes`` (:func:`engine_sizes`'
    answer; None: made from ``args`` here) and ``fields``. ``--dtype auto`` resolves for the chosen
    device (bf16 on CUDA).

    Raises:
        ValueError: a flag out of range (the message names the config field).
    """
    from nlora_serve.models import resolve_dtype  # here: the models package loads torch (not for --help)

    scheduler, cache = engine_sizes(args) if sizes is None else sizes
    device = str(resolve_device(args.device or "auto"))
    for name in ("gpu_memory_utilization", "piecewise_graphs", "cpu_gemm", "cpu_amx"):
        if getattr(args, name) is not None:  # else EngineConfig's default
            fields[name] = getattr(args, name)
    fields.setdefault("step_timeout_s", args.engine_step_timeout)  # None: the device's default
    return EngineConfig(model=args.model, dtype=resolve_dtype(args.dtype, device), device=device,
                        load_format=args.load_format, tokenizer=args.tokenizer, scheduler=scheduler, cache=cache,
                        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling, **fields)


def add_generation_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, fields: str,
                                    capped: str) -> None:
    """vLLM's ``--generation-config`` / ``--override-generation-config`` (serving/generation_config.py
    and, for the EOS ids, engine/eos.py): ``fields`` names what the defaults fill, ``capped`` what a
    folder's or the override's max_new_tokens caps."""
    a = parser.add_argument
    a("--generation-config", default="auto",
      help=f"{fields} (temperature, top_p, top_k, min_p, repetition_penalty, presence/"
           "frequency_penalty, max_tokens from max_new_tokens): 'auto' = the model's generation_config.json, "
           "'vllm' = vLLM's own defaults, or a folder holding a generation_config.json, else a config.json "
           f"(its max_new_tokens also caps {capped}); the model's (auto, vllm) or the folder's eos_token_id ends "
           "generation beside the tokenizer's EOS (default: %(default)s, as vLLM)")
    a("--override-generation-config", type=_override, default={}, metavar="JSON",
      help="a JSON object of sampling fields merged over --generation-config's, e.g. "
           f"'{{\"temperature\": 0.5}}' (null unsets one; its max_new_tokens caps {capped}; other keys are "
           "ignored, as vLLM ignores them)")


def _override(value: str) -> dict:
    from nlora_serve.serving.generation_config import parse_override  # its checks load torch: only when given

    try:
        return parse_override(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
