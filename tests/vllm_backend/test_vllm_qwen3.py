"""Qwen3 (dense) through ``--backend vllm``: a tiny random Qwen3ForCausalLM (tests/engine/test_qwen3.py's
shape: head_dim 32, not hidden / heads, q/k head norms drawn away from 1) on vLLM's AsyncLLM in
float32 on the CPU, with a LoRA tenant and a tied IntTune tenant (folded to plain LoRA) in one batch
beside a base-model request. Greedy tokens equal transformers' on the same weights, each adapter
merged into them in float64 (tiny_llama.merged: W + s·B·N·A), by the cases README rule.
Runs only where vllm is importable (see conftest.py).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch

from grpc_harness import matches_reference
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.sample.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # tiny_llama: the adapters and references
from tiny_llama import hf_greedy, make_tiny_qwen3, merged, random_factors, write_peft  # noqa: E402

RANK, ALPHA, NEW_TOKENS = 4, 8.0, 4

def test_qwen3_base_lora_and_tied_tenants_on_vllm_equal_transformers(base_model_dir, tmp_path):
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine import VllmEngine
    from nlora_serve.models import load_base

    model = make_tiny_qwen3(tmp_path / "qwen3")
    lora = random_factors(model, rank=RANK, with_n=False, seed=2, scale=0.2)
    tied = random_factors(model, rank=RANK, tied=True, with_n=True, seed=1)
    refs = {None: model, "lora": merged(model, lora, rank=RANK, alpha=ALPHA),
            "tied": merged(model, tied, rank=RANK, alpha=ALPHA)}
    gen = torch.Generator().manual_seed(3)
    jobs = [(name, torch.randint(3, 49152, (length,), generator=gen).tolist())
            for name, length in ((None, 5), ("lora", 12), ("tied", 19))]

    base = load_base(str(tmp_path / "qwen3"), torch.float32, tokenizer=base_model_dir)
    config = EngineConfig(dtype=torch.float32, adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          adapter_limits=AdapterLimits(max_rank=16))
    engine = VllmEngine(config, VllmBackendConfig(max_loras=2), base)
    try:
        engine.adapters.register_dir("lora", write_peft(tmp_path / "lora", lora, rank=RANK, alpha=ALPHA))
        engine.adapters.register_dir("tied", write_peft(tmp_path / "tied", tied, rank=RANK, alpha=ALPHA))
        assert engine.adapters.registry.get("tied").is_tied and not engine.adapters.registry.get("lora").is_tied

        async def greedy(name, prompt):
            params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
            return [t async for out in engine.add_request(prompt, params, adapter=name) for t in out.token_ids]

        async def all_jobs():
            return await asyncio.gather(*(greedy(name, prompt) for name, prompt in jobs))
        outs = asyncio.run(all_jobs())
    finally:
        engine.shutdown()
    for (name, prompt), got in zip(jobs, outs):
        want, margins = hf_greedy(refs[name], prompt, NEW_TOKENS)
        assert matches_reference(got, want, margins), (name, got, want)
        if name is not None:  # an adapter dropped (the base model's tokens) would show
            assert hf_greedy(model, prompt, NEW_TOKENS)[0] != want, name
