"""The CUDA KV budget (engine/runner/memory.py) on the CPU: a fake allocator-stats source stands for the
GPU's, and spies check that the profiling step runs the sampler's worst case (every sampling option,
``max_num_seqs`` rows of the whole vocabulary) between the peaks it reads; the split of the device's
memory and the CUDA graphs' share are checked against hand-computed numbers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nlora_serve.engine.runner import dummy_sampler, memory
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.runner.dummy_sampler import WORST_CASE, dummy_sampler_run
from nlora_serve.engine.runner.memory import GiB, KvBudget, graph_held_bytes

LLAMA_8B = SimpleNamespace(vocab_size=128256, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128)


class FakeStats:
    """Allocator counters from a script: ``allocated`` constant, ``peak`` the next scripted value."""

    def __init__(self, allocated: int, peaks: list[int], free: int, total: int) -> None:
        self.held, self.peaks, self.info = allocated, list(peaks), (free, total)
        self.events: list[str] = []

    def synchronize(self) -> None:
        pass

    def allocated(self) -> int:
        self.events.append("allocated")
        return self.held

    def reset_peak(self) -> None:
        self.events.append("reset_peak")

    def peak(self) -> int:
        self.events.append("peak")
        return self.peaks.pop(0)

    def mem_get_info(self) -> tuple[int, int]:
        return self.info

    def empty_cache(self) -> None:
        self.events.append("empty_cache")


def test_budget_is_the_utilization_target_less_everything_else():
    b = KvBudget(total=80 * GiB, utilization=0.9, in_use=17 * GiB, activations=GiB, graphs=2 * GiB, adapters=GiB)
    assert b.kv_bytes == int(72 * GiB) - 21 * GiB
    assert "1.00 GiB for a step's activations and sampler, 2.00 GiB for CUDA graphs" in b.describe()


def _config(max_num_seqs: int, budget: int, max_model_len: int, piecewise: bool):
    return SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                                     max_model_len=max_model_len),
                           cache=SimpleNamespace(block_size=16), piecewise_graphs=piecewise)


def test_graphs_hold_one_shared_logits_output_llama_8b_shape():
    # one [256, V] float32 output for all graphs (it was one per capture size: 1, 2, 4, 8..248 by 8,
    # 256 -> 4231 rows, 2.02 GiB, and 1264 more rows with piecewise buckets) and the static inputs:
    # ids, positions, slots, context lengths, arange (int64) and a 512-block table row per sequence
    decode = 256 * (LLAMA_8B.vocab_size * 4 + 5 * 8 + 512 * 4)
    assert graph_held_bytes(_config(256, 2048, 8192, False), LLAMA_8B, torch.bfloat16) == decode
    assert decode / GiB == pytest.approx(0.123, abs=0.001)
    # piecewise: the 2048-token bucket's ids, positions, slots, cos, sin, residual, q/k and attention output
    per_token = 3 * 8 + 2 * 128 * 4 + 4096 * 4 + (2 * 32 + 8) * 128 * 2
    assert graph_held_bytes(_config(256, 2048, 8192, True), LLAMA_8B, torch.bfloat16) == decode + 2048 * per_token


@pytest.fixture(scope="module")
def core(base_fp32):
    config = EngineConfig(device="cpu", kernel_backend="torch",
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=8))
    return EngineCore(config, base_fp32)


def _spy_sampler(monkeypatch, events: list[str]) -> list:
    seen = []
    real = dummy_sampler.sample_step

    def spy(logits, pairs, seqs, bans, shared, *args):
        events.append("sample")
        seen.append((tuple(logits.shape), [s.params for s in seqs]))
        return real(logits, pairs, seqs, bans, shared, *args)

    monkeypatch.setattr(dummy_sampler, "sample_step", spy)
    monkeypatch.setattr(dummy_sampler, "mask_rows", lambda logits, rows, matchers: events.append(
        f"mask {tuple(logits.shape)} rows {rows} {set(matchers)}"))
    return seen


def test_profile_samples_the_worst_case_between_the_peaks_it_reads(core, monkeypatch):
    stats = FakeStats(allocated=1000, peaks=[1000 + 300, 1000 + 500], free=70 * GiB, total=80 * GiB)
    seen = _spy_sampler(monkeypatch, stats.events)
    budget = memory.plan_kv_budget(core.config, core.runner, stats)
    # the forward's peak is read, then the sampler runs (bitmask first), then the step's peak
    assert stats.events == ["allocated", "reset_peak", "peak", f"mask (8, 49152) rows {list(range(8))} {{None}}",
                            "sample", "peak", "empty_cache"]
    assert seen == [((8, 49152), [WORST_CASE] * 8)]  # max_num_seqs rows of the whole vocabulary
    assert core.runner.kv_cache is None  # the profile's cache is freed
    # no graphs on the CPU; no adapter store
    assert budget == KvBudget(80 * GiB, 0.9, 10 * GiB, 500, 0, 0)


def test_graphs_count_the_forward_peak_again_and_their_outputs(core, monkeypatch):
    monkeypatch.setattr(memory, "graphs_enabled", lambda config, device: True)
    monkeypatch.setattr(memory, "profile_step", lambda config, runner, stats: memory.StepProfile(300, 200))
    stats = FakeStats(allocated=1000, peaks=[], free=70 * GiB, total=80 * GiB)
    held = graph_held_bytes(core.config, core.runner.spec, core.runner.dtype)
    assert held == 8 * (49152 * 4 + 5 * 8 + 4 * 4)  # 8 rows of logits; 4-block tables
    assert memory.plan_kv_budget(core.config, core.runner, stats) == KvBudget(80 * GiB, 0.9, 10 * GiB, 300,
                                                                              300 + held, 0)
    per_block = 1 << 20
    want = int(72 * GiB) - 10 * GiB - 300 - (300 + held) - per_block  # less the graphs' sink block
    assert memory._cuda_budget(core.config, core.runner, per_block, stats) == want
    stats.info = (8 * GiB, 80 * GiB)  # 72 GiB in use: nothing is left
    with pytest.raises(ValueError, match=r"72.00 GiB in use.*0.00 GiB for CUDA graphs.*--max-num-seqs"):
        memory._cuda_budget(core.config, core.runner, per_block, stats)


def test_dummy_sampler_uses_every_option_and_refuses_bad_logits():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    step = dummy_sampler_run(logits.clone(), torch.Generator().manual_seed(0))
    assert len(step.seqs) == 4 and step.top_k == 20 and step.needs_values  # 20 logprobs; penalties read tokens
    p = WORST_CASE
    assert not p.greedy and p.top_k > 0 and p.top_p < 1 and p.min_p > 0 and p.logit_bias and p.reads_token_values
    with pytest.raises(ValueError, match=r"\[R > 0, V\] float32 logits; got \(4, 64\) torch.float64"):
        dummy_sampler_run(logits.double(), torch.Generator())
