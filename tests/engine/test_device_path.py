"""The engine's CUDA code path, run on CPU tensors: Triton attention and adapter kernels under the
Triton interpreter (``kernel_backend="triton"``), on a tiny random Llama with 3 query heads per KV
head. Base, tied IntTune, NLoRA (group path) and LoRA requests in one mixed batch, with chunked
prefill and a preemption; greedy tokens must equal transformers on merged weights (DESIGN §5).
"triton-fused": the same with the tied path in its one-launch form (tied_fused.py); "triton-tiled":
with its expand tiled over token blocks (tied_expand.py). "triton" runs the group path in its default
grouped form (grouped_shrink.py / grouped_expand.py, per-slot ranks on the device), "triton-bgmv" in
the earlier per-token form.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import hf_greedy, make_tiny_llama, merged, random_factors, write_peft  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402
from nlora_serve.kernels.triton_ops import triton_path  # noqa: E402

RANK, ALPHA, NEW_TOKENS = 8, 16.0, 6
TENANTS = {  # name -> (factor kind, seed)
    "tied": dict(tied=True, with_n=True, seed=1),
    "nlora": dict(with_n=True, seed=2),
    "lora": dict(with_n=False, seed=3),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_model_dir):
    """The tiny model's folder, its transformers model, and each tenant's folder and merged model."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(root / "model")
    tenants = {}
    for name, kind in TENANTS.items():
        factors = random_factors(model, rank=RANK, **kind)
        tenants[name] = (write_peft(root / name, factors, rank=RANK, alpha=ALPHA),
                         merged(model, factors, rank=RANK, alpha=ALPHA))
    return root / "model", model, tenants, base_model_dir


@pytest.fixture(scope="module")
def jobs(tiny):
    """(tenant or None, prompt, transformers' greedy tokens, their margins) per request: once per module."""
    _, model_obj, tenants, _ = tiny
    gen = torch.Generator().manual_seed(11)
    lengths = [5, 40, 17, 70, 33, 9, 52, 26]  # several prefill chunks of a 32-token budget
    names = [None, "tied", "nlora", "lora", "tied", "lora", None, "nlora"]
    jobs = []
    for length, name in zip(lengths, names):
        prompt = torch.randint(3, 49152, (length,), generator=gen).tolist()
        ref_model = model_obj if name is None else tenants[name][1]
        jobs.append((name, prompt, *hf_greedy(ref_model, prompt, NEW_TOKENS)))
    return jobs


# per run, the form under test: (the module constant, its value, the launcher whose kernel must run)
FORMS = {"triton-fused": ("TIED_FORM", "fused", triton_path.tied_fused),
         "triton-tiled": ("TIED_FORM", "tiled", triton_path.tied_expand),
         "triton-bgmv": ("GROUP_FORM", "bgmv", triton_path.bgmv_shrink),
         "triton": ("GROUP_FORM", "grouped", triton_path.grouped_shrink)}


@pytest.mark.parametrize("kernel_backend", ["triton", "triton-fused", "triton-tiled", "triton-bgmv", "torch",
                                            "torch-async"])
def test_mixed_tenants_chunked_and_preempted_equal_transformers(tiny, jobs, tmp_path, kernel_backend, monkeypatch):
    model_dir, _, tenants, tokenizer_dir = tiny
    # "torch-async": the torch ops with async scheduling (steps launched before the last one's
    # tokens are read back: preempted and chunked sequences with a token still in flight)
    overlap = kernel_backend.endswith("-async")
    kernel_backend = kernel_backend.removesuffix("-async")
    fused_launches, counted_form = [], kernel_backend in FORMS
    fused = counted_form and kernel_backend != "triton"  # the shortened runs
    if counted_form:
        constant, form, launcher = FORMS[kernel_backend]
        kernel_backend = "triton"
        monkeypatch.setattr(triton_path, constant, form)
        kernel = launcher.__globals__[f"_{launcher.__name__}_kernel"]
        run = kernel.run

        def counted(*args, **kwargs):
            fused_launches.append(1)
            return run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counted)
    # 14 blocks of 16 tokens cannot hold all eight sequences at their full length: the newest
    # running sequence is preempted and recomputed at least once.
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu",
                          kernel_backend=kernel_backend, adapter_dir=str(tmp_path / "store"), async_scheduling=overlap,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128),
                          cache=CacheConfig(block_size=16, num_blocks=14))
    new_tokens = NEW_TOKENS
    if fused:  # CI time: one of each tenant kind is what the form changes; the shortest of each
        # (5, 33, 17, 9 tokens: 64 in all, not 132), the 33-token tied prompt still in two chunks,
        # and 3 new tokens (2 decode steps) checked against the first 3 of the reference's 6
        jobs, new_tokens = [jobs[i] for i in (0, 4, 2, 5)], 3
    jobs = [(name, prompt, want[:new_tokens], margins[:new_tokens]) for name, prompt, want, margins in jobs]
    with LLMEngine(config) as engine:
        for name, (folder, _) in tenants.items():
            engine.adapters.register_dir(name, folder)
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
        outs = engine.generate([p for _, p, _, _ in jobs], params, [n for n, _, _, _ in jobs])
        stats = engine.stats()
    assert stats["preemptions"] >= 1 or fused, stats
    assert fused_launches or not counted_form, "the form under test never launched"
    for (name, _, want, margins), out in zip(jobs, outs):
        assert out.adapter == name
        assert matches_reference(out.token_ids, want, margins), (name, out.token_ids, want, margins)
    assert engine.core.adapters.versions()[0].refcount == 0
