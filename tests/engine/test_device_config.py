"""EngineConfig's device fields: refusals name the field and value; the KV sizing arithmetic."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig, resolve_device
from nlora_serve.engine.core import EngineCore
from nlora_serve.kernels.cpu.gemm import NativeLinear, PackedLinear
from nlora_serve.engine.runner.memory import pool_bytes
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


# SmolLM2-135M's KV block in fp32, by hand: 30 layers x (K, V) x 16 tokens x 3 KV heads x 64 dims x 4 bytes
SMOLLM2_FP32_BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # 737,280


def test_the_cpu_kv_cache_is_one_gib_unless_kv_cache_memory_bytes_says_otherwise():
    assert CacheConfig().resolve_num_blocks(SMOLLM2_FP32_BLOCK_BYTES) == (1 << 30) // 737_280 == 1456
    sized = CacheConfig(kv_cache_memory_bytes=10 * SMOLLM2_FP32_BLOCK_BYTES + 1000)
    assert sized.resolve_num_blocks(SMOLLM2_FP32_BLOCK_BYTES) == 10
    with pytest.raises(ValueError, match=r"CacheConfig.kv_cache_memory_bytes must be a positive integer; got 0"):
        CacheConfig(kv_cache_memory_bytes=0)


def test_the_engine_sizes_its_kv_cache_from_the_flag_and_logs_what_it_holds(base_fp32, caplog):
    # a newcomer found the CPU cache fixed at 1 GiB, no flag to change it, and no log of its size
    config = EngineConfig(device="cpu", kernel_backend="torch",
                          scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(kv_cache_memory_bytes=10 * SMOLLM2_FP32_BLOCK_BYTES + 1000))
    with caplog.at_level("INFO", logger="nlora_serve.engine.runner.memory"):
        core = EngineCore(config, base_fp32)
    assert core.blocks.num_blocks == 10
    assert tuple(core.runner.kv_cache.shape) == (30, 2, 10, 16, 3, 64)
    assert [r.getMessage() for r in caplog.records if r.name == "nlora_serve.engine.runner.memory"] == [
        "KV cache: 10 blocks of 16 tokens = 160 tokens, 0.01 GiB; 2.5 requests of --max-model-len 64 tokens at "
        "once (--kv-cache-memory-bytes sizes it)"]


def test_a_cache_too_small_for_max_model_len_names_the_flag_that_grows_it():
    config = EngineConfig(device="cpu", scheduler=SchedulerConfig(max_model_len=2048))
    with pytest.raises(ValueError, match=r"KV cache of 10 blocks x 16 tokens cannot hold one sequence of "
                                         r"max_model_len=2048 tokens \(128 blocks\); lower --max-model-len or "
                                         r"raise --kv-cache-memory-bytes"):
        config.check_capacity(10)


def test_kv_cache_memory_bytes_is_a_serve_flag_in_vllms_spelling():
    import argparse

    from nlora_serve.serving.commands.serve import add_serve_arguments
    from nlora_serve.serving.commands.engine_flags import device_config, in_flag_words

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert device_config(parser.parse_args(["--device", "cpu"])).cache.kv_cache_memory_bytes is None
    args = parser.parse_args(["--device", "cpu", "--kv-cache-memory-bytes", "4294967296"])
    assert device_config(args).cache.kv_cache_memory_bytes == 4 << 30
    bad = parser.parse_args(["--device", "cpu", "--kv-cache-memory-bytes", "0"])
    with pytest.raises(ValueError) as err:
        device_config(bad)
    assert in_flag_words(str(err.value), bad) == "--kv-cache-memory-bytes 0: must be a positive integer; got 0"
