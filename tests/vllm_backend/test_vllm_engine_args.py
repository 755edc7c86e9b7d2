"""What VllmEngine hands vLLM's AsyncEngineArgs for our flags (vLLM's engine is not started: its
from_engine_args is replaced by one that records the arguments and refuses)."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.models import load_base


class _Refused(Exception):
    pass


@pytest.fixture
def engine_args(monkeypatch):
    """Builds a VllmEngine from (EngineConfig fields, base model) and returns the AsyncEngineArgs it passed."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    seen = []

    def record(cls, args, **kwargs):
        seen.append(args)
        raise _Refused

    monkeypatch.setattr(AsyncLLM, "from_engine_args", classmethod(record))

    def build(base, backend=None, **fields):
        fields.setdefault("scheduler", SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256))
        config = EngineConfig(dtype=torch.float32, **fields)
        with pytest.raises(_Refused):
            VllmEngine(config, backend, base)
        return seen[-1]
    return build


def test_vllm_detokenizes_with_the_tokenizer_the_front_end_uses(engine_args, base_model_dir, tmp_path):
    # a model folder without a tokenizer, served with --tokenizer DIR: vLLM was given the model
    # folder as its tokenizer and refused to start ("Couldn't instantiate the backend tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(base_model_dir / name)
    base = load_base(str(tmp_path), torch.float32, tokenizer=str(base_model_dir))
    args = engine_args(base, model=str(tmp_path), tokenizer=str(base_model_dir))
    assert (args.model, args.tokenizer) == (str(tmp_path), str(base_model_dir))


def test_load_format_dummy_reaches_vllm(engine_args, base_fp32):
    # vLLM read the folder's real weights (beside adapters folded against our random ones), or
    # failed to start on a folder of config.json alone, the flag's use
    assert engine_args(base_fp32, load_format="dummy").load_format == "dummy"
    assert engine_args(base_fp32).load_format == "auto"


def test_max_loras_is_vllms_max_loras_on_the_cpu_too(engine_args, base_fp32, tmp_path):
    # on the CPU base-model requests run on an all-zero LoRA, which had one more vLLM slot of its
    # own: --max-loras 2 ran 3 adapters in one batch and held 3 in vLLM's CPU LoRA cache whenever no
    # base request ran, and --max-loras 2 --vllm-arg max_cpu_loras=2 failed vLLM's own check
    # (max_cpu_loras 2 < max_loras 3). References: the flag, and vLLM's LoRAConfig validation.
    from vllm.config.lora import LoRAConfig

    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig

    args = engine_args(base_fp32, VllmBackendConfig(max_loras=2, engine_args={"max_cpu_loras": 2}),
                       adapter_dir=str(tmp_path))
    assert (args.enable_lora, args.max_loras, args.max_cpu_loras) == (True, 2, 2)
    lora = LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras)
    assert (lora.max_loras, lora.max_cpu_loras) == (2, 2)


def test_long_prefill_token_threshold_reaches_vllm(engine_args, base_fp32):
    # vLLM 0.32 caps a long prefill per step with the same flag; unset, vLLM gets its own default, 0,
    # under "fair" too (the native scheduler's 128 between tenants is no vLLM default, and vLLM
    # schedules fcfs)
    args = engine_args(base_fp32)
    assert (args.long_prefill_token_threshold, args.long_prefill_token_threshold_adaptive) == (0, False)
    args = engine_args(base_fp32, scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256,
                                                            max_model_len=256, policy="fair"))
    assert args.long_prefill_token_threshold == 0
    scheduler = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256,
                                long_prefill_token_threshold=64, long_prefill_token_threshold_adaptive=True)
    args = engine_args(base_fp32, scheduler=scheduler)
    assert (args.long_prefill_token_threshold, args.long_prefill_token_threshold_adaptive) == (64, True)


def test_the_generation_config_flags_reach_vllm(engine_args, base_fp32, tmp_path):
    # vLLM's model config reads the same generation config as the front end (its EOS ids among them)
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig

    args = engine_args(base_fp32)
    assert (args.generation_config, args.override_generation_config) == ("auto", {})
    backend = VllmBackendConfig(generation_config=str(tmp_path), override_generation_config={"temperature": 0.5})
    args = engine_args(base_fp32, backend)
    assert (args.generation_config, args.override_generation_config) == (str(tmp_path), {"temperature": 0.5})
    with pytest.raises(ValueError, match="--vllm-arg generation_config: the backend sets it from --generation-config"):
        VllmBackendConfig(engine_args={"generation_config": "vllm"})
