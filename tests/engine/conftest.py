"""Helpers for the serving tests: small fp32 engines on the default model."""

from __future__ import annotations

import gc

import pytest

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine


@pytest.fixture
def make_engine(base_fp32):
    """Factory for fp32 engines sharing the session's base weights; shut down after the test."""
    engines: list[LLMEngine] = []

    def make(block_size: int = 16, num_blocks: int = 256, max_num_seqs: int = 16,
             max_num_batched_tokens: int = 512, max_model_len: int = 1024,
             async_scheduling: bool | None = None) -> LLMEngine:
        config = EngineConfig(async_scheduling=async_scheduling,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks))
        engines.append(LLMEngine(config, base_fp32))
        # these tests check the tokens a grammar allows, not the deadline (test_structured_compiler's):
        # on CI's 2 saturated cores a spec that compiles in 0.2 s once waited past 5 s
        # (test_structured[sentence], 2026-12-07, when compiles ran at nice 19 from their start)
        engines[-1].core.grammars.timeout_s = 60.0
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()
    engines.clear()
    gc.collect()  # free them now, not when the cycle collector next runs (grpc_harness.stop_all)
