"""Launch configurations: defaults, derived rules, and a per-device file's overrides."""

import json

import pytest
import torch

from nlora_serve.kernels.triton_ops import config


@pytest.fixture
def config_dir(monkeypatch, tmp_path):
    """An empty configs/ dir and a CUDA device named like an H200; caches cleared both ways."""
    monkeypatch.setattr(config, "_CONFIG_DIR", tmp_path)
    monkeypatch.setattr(config, "_cuda_name", lambda index: "NVIDIA H200")
    config._device_file.cache_clear()
    config._config.cache_clear()
    yield tmp_path
    config._device_file.cache_clear()
    config._config.cache_clear()


def test_cpu_tensors_use_the_defaults():
    assert config.device_config_name(torch.device("cpu")) == "default"
    cfg = config.get_config("sgmv_shrink", 64)
    # 64 ranks: 8 warps, N chunks of 16 columns, [BLOCK_K, 64] A tiles of 4K elements
    assert (cfg["num_warps"], cfg["BLOCK_I"], cfg["BLOCK_K"], cfg["BLOCK_R"]) == (8, 16, 64, 64)
    assert config.get_config("sgmv_shrink", 16)["num_warps"] == 4


def test_a_device_file_overrides_the_defaults_for_that_device_only(config_dir):
    (config_dir / "NVIDIA_H200.json").write_text(json.dumps(
        {"sgmv_expand": {"16": {"BLOCK_T": 64, "BLOCK_N": 128, "num_warps": 8}}}))
    name = config.device_config_name(torch.device("cuda", 0))
    assert name == "NVIDIA H200"
    tuned = config.get_config("sgmv_expand", 16, name)
    assert (tuned["BLOCK_T"], tuned["BLOCK_N"], tuned["num_warps"], tuned["BLOCK_R"]) == (64, 128, 8, 16)
    assert config.get_config("sgmv_expand", 32, name)["BLOCK_T"] == 16  # other ranks: defaults
    assert config.get_config("sgmv_expand", 16)["BLOCK_T"] == 16  # other devices: defaults
    tuned["BLOCK_T"] = 1  # callers get a copy
    assert config.get_config("sgmv_expand", 16, name)["BLOCK_T"] == 64
