"""Prompt log-probabilities of tenants (tied IntTune, LoRA) on every kernel backend: the CPU paths
("native", "torch") and the CUDA path's code on CPU tensors ("triton" under the Triton interpreter,
with decode and piecewise graphs through the CPU seam), against transformers' float64 log_softmax
on merged weights (tiny_llama.merged), the scored rows in 5-row chunks. Plain requests in the same
batches keep their reference tokens, and their decode steps still replay graphs."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import graph_tenants, hf_greedy  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402

RANK, ALPHA, NEW, BUDGET = 8, 16.0, 3, 32
# (adapter, prompt length, prompt_logprobs): two scored tenants, one over the 32-token budget
# (chunked), beside plain requests on the base model and the tied tenant
JOBS = (("tied", 45, 3), (None, 12, None), ("lora_attn", 30, 2), ("tied", 7, None), (None, 20, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_model_dir):
    return (*graph_tenants(tmp_path_factory.mktemp("tiny"), RANK, ALPHA), base_model_dir)


@pytest.mark.parametrize("kernel_backend", ["native", "torch", "triton"])
def test_tenant_prompt_logprobs_equal_transformers_on_merged_weights(tiny, tmp_path, kernel_backend):
    model_dir, model, tenants, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu",
                          kernel_backend=kernel_backend, async_scheduling=False, adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=BUDGET, max_model_len=80),
                          cache=CacheConfig(block_size=16, num_blocks=40))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for _, n, _ in JOBS]
    params = [SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0, prompt_logprobs=k) for *_, k in JOBS]
    with LLMEngine(config) as engine:
        engine.core.runner.score_chunk_rows = 5  # a step's up to 31 scored rows in several lm_head calls
        if kernel_backend == "triton":
            engine.core.runner.enable_graphs(8, EagerCapture(), piecewise_tokens=BUDGET)
        for name in ("tied", "lora_attn"):
            engine.adapters.register_dir(name, tenants[name][0])
        outs = engine.generate(prompts, params, [name for name, _, _ in JOBS])
        stats = engine.stats()
    for (name, _, k), prompt, out in zip(JOBS, prompts, outs):
        ref = model if name is None else tenants[name][1]
        want, margins = hf_greedy(ref, prompt, NEW)
        assert matches_reference(out.token_ids, want, margins), (name, out.token_ids, want)
        if k is None:
            assert out.prompt_logprobs is None
            continue
        with torch.inference_mode():
            rows = ref(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for p, scored in enumerate(got[1:]):
            entry = scored.logprobs
            token = prompt[p + 1]
            assert entry[token] == pytest.approx(float(rows[p, token]), abs=1e-4), (name, p)
            top = rows[p].topk(k)
            assert all(entry[t] == pytest.approx(v, abs=1e-4) for t, v in zip(top.indices.tolist(),
                                                                               top.values.tolist())), (name, p)
    if kernel_backend == "triton":  # the scored prefill steps ran eagerly, every decode step from its graph
        assert stats["graph_steps"] == NEW - 1 and stats["eager_steps"] >= 2, stats
