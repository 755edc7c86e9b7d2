"""EngineConfig's device fields: refusals name the field and value; the KV sizing arithmetic."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.adapters.manager import AdapterLimits
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig, resolve_device
from nlora_serve.engine.core import EngineCore
from nlora_serve.kernels.cpu.gemm import NativeLinear, PackedLinear
from nlora_serve.engine.memory import pool_bytes
from nlora_serve.models import read_spec


def test_auto_device_and_backend_follow_what_torch_sees():
    config = EngineConfig()
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.device == want
    assert config.kernel_backend == ("triton" if want == "cuda" else "native")


@pytest.mark.parametrize("fields, message", [
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    ({"kernel_backend": "cuda"}, "kernel_backend must be one of auto, native, torch, triton; got 'cuda'"),
    ({"load_format": "pt"}, "load_format must be 'auto' or 'dummy'; got 'pt'"),
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be a float in (0, 1]; got 0.0"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be a float in (0, 1]; got 1.5"),
    ({"cpu_gemm": "mkl"}, "cpu_gemm must be one of native, onednn; got 'mkl'"),
    ({"cpu_amx": 0}, "cpu_amx must be True or False; got 0"),
])
def test_bad_device_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError) as err:
        EngineConfig(**fields)
    assert message in str(err.value)


@pytest.mark.parametrize("cpu_gemm", ["native", "onednn"])
def test_cpu_gemm_and_amx_fields_reach_the_model_and_the_native_ops(base_fp32, cpu_gemm):
    config = EngineConfig(device="cpu", kernel_backend="native", cpu_gemm=cpu_gemm, cpu_amx=False,
                          scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(num_blocks=8))
    core = EngineCore(config, base_fp32)
    native = core.hook.native
    assert native is not None and native.amx is False
    ours = cpu_gemm == "native" and native.gemm.supports(torch.float32)
    packed = [p.packed for layer in core.runner.model.layers for p in layer.projections()]
    assert all(type(p) is (NativeLinear if ours else PackedLinear) for p in packed)


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here.*use --device cpu"):
        resolve_device("cuda")


def test_adapter_pool_room_is_the_tied_budget_plus_a_full_lora_pool(base_model_dir):
    spec = read_spec(base_model_dir)  # SmolLM2-135M: hidden 576, intermediate 1536, q 576, kv 192
    limits = AdapterLimits(max_rank=16, max_loras=2, adapter_memory=1000)
    # per layer: sum over the seven projections of r * (in + out + r), by hand
    per_layer = 16 * ((576 + 576 + 16) + 2 * (576 + 192 + 16) + (576 + 576 + 16)
                      + 2 * (576 + 1536 + 16) + (1536 + 576 + 16))
    assert pool_bytes(spec, torch.bfloat16, limits) == 1000 + 2 * 30 * per_layer * 2


def test_cpu_gemm_and_amx_are_serve_flags():
    # they were environment variables the model and kernels read; now config fields the CLI fills
    import argparse

    from nlora_serve.serving.commands.serve import add_serve_arguments
    from nlora_serve.serving.commands.engine_flags import device_config

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    default = device_config(parser.parse_args(["--device", "cpu"]))
    assert (default.cpu_gemm, default.cpu_amx) == ("native", True)
    chosen = device_config(parser.parse_args(["--device", "cpu", "--cpu-gemm", "onednn", "--no-cpu-amx"]))
    assert (chosen.cpu_gemm, chosen.cpu_amx) == ("onednn", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpu-gemm", "mkl"])
