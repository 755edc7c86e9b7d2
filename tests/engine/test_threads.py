"""Which thread runs torch in parallel (engine/threads.py): the step thread, with the count the
main thread handed over or EngineConfig.cpu_threads; every other thread stays at one."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.threads import engine_threads, threads_for_engine


@pytest.fixture
def two_threads():
    """The calling thread at 2 torch threads for the test, its count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _step_thread_count(engine: LLMEngine) -> int:
    """torch's thread count as seen inside the engine's step thread, during a real step."""
    seen: list[int] = []
    step = engine.core.step

    def probe():
        seen.append(torch.get_num_threads())
        return step()

    engine.core.step = probe
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
    return seen[0]


def test_threads_for_engine_hands_the_count_over_and_back(two_threads):
    with threads_for_engine() as count:
        assert count == 2
        assert torch.get_num_threads() == 1  # the caller's parallel team would throttle the step thread's
        assert engine_threads(None) == 2
        assert engine_threads(3) == 3  # EngineConfig.cpu_threads wins
    assert torch.get_num_threads() == 2
    assert engine_threads(None) == 2  # outside: the calling thread's own count


def test_step_thread_runs_with_the_handed_over_count(two_threads, base_fp32):
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64))
    with threads_for_engine(), LLMEngine(config, base_fp32) as engine:
        assert _step_thread_count(engine) == 2
        assert torch.get_num_threads() == 1  # the main thread stays single-threaded meanwhile


def test_step_thread_runs_with_cpu_threads(two_threads, base_fp32):
    config = EngineConfig(cpu_threads=1, scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                                                    max_model_len=64))
    with LLMEngine(config, base_fp32) as engine:
        assert _step_thread_count(engine) == 1
    assert torch.get_num_threads() == 2  # the caller's count untouched


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_cpu_threads_out_of_range(bad):
    with pytest.raises(ValueError, match="EngineConfig.cpu_threads must be a positive integer"):
        EngineConfig(cpu_threads=bad)
