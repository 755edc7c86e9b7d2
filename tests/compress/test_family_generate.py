"""Compressed family members served end to end: LLMEngine's greedy tokens on a tiny random Llama
(3 query heads per KV head) equal transformers with each member folded into its weights (W +
B_f·N·A_f, in float64, read from the family's files), mixed with the base model and a plain LoRA,
on the native CPU path and on the CUDA path run under the Triton interpreter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the engine tests' tiny Llama helpers

from family_helpers import family_deltas  # noqa: E402
from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import hf_greedy, make_tiny_llama, merged, module_path, random_factors, write_peft  # noqa: E402
from nlora_serve.adapters.compress.build import compress_adapters, write_family  # noqa: E402
from nlora_serve.adapters.loader import read_adapter  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402
from nlora_serve.models import load_base  # noqa: E402

RANK, ALPHA, FAMILY_RANK, NEW_TOKENS = 4, 8.0, 6, 5
MEMBERS = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory, base_model_dir):
    """The tiny model, a family compressed from three random LoRAs at a rank below their sum (so
    the members differ from the LoRAs), one plain LoRA, and a transformers reference of each."""
    root = tmp_path_factory.mktemp("tiny-family")
    model = make_tiny_llama(root / "model", seed=4)
    loras = {n: write_peft(root / "loras" / n, random_factors(model, rank=RANK, with_n=False, seed=10 + i),
                           rank=RANK, alpha=ALPHA) for i, n in enumerate(MEMBERS)}
    base = load_base(str(root / "model"), torch.float32, tokenizer=base_model_dir)
    family = compress_adapters({n: read_adapter(d, base) for n, d in loras.items()}, FAMILY_RANK)
    write_family(root / "family", family)
    refs = {}
    for n in MEMBERS:
        folded = merged(model, {}, rank=RANK, alpha=ALPHA)  # a copy of the base model
        with torch.no_grad():
            for (layer, module), delta in family_deltas(root / "family", n).items():
                w = folded.get_submodule(module_path(layer, module)).weight
                w.copy_((w.double() + delta).to(w.dtype))
        refs[n] = folded
    plain = random_factors(model, rank=RANK, with_n=False, seed=20)
    refs["plain"] = merged(model, plain, rank=RANK, alpha=ALPHA)
    write_peft(root / "plain", plain, rank=RANK, alpha=ALPHA)
    refs[None] = model
    return root, refs, base_model_dir


@pytest.mark.parametrize("kernel_backend", ["native", "triton"])
def test_family_members_generate_as_transformers_on_folded_weights(tiny_family, tmp_path, kernel_backend):
    root, refs, tokenizer_dir = tiny_family
    config = EngineConfig(model=str(root / "model"), tokenizer=str(tokenizer_dir), device="cpu",
                          kernel_backend=kernel_backend, adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=128),
                          cache=CacheConfig(block_size=16, num_blocks=64))
    gen = torch.Generator().manual_seed(3)
    names = ["m0", None, "m1", "plain", "m2", "m0", "m2", None]
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (9, 30, 21, 14, 40, 5, 17, 26)]
    want = [hf_greedy(refs[n], p, NEW_TOKENS) for n, p in zip(names, prompts)]
    with LLMEngine(config) as engine:
        for n in MEMBERS:
            engine.adapters.register_dir(n, root / "family" / n)
        engine.adapters.register_dir("plain", root / "plain")
        pools = {type(engine.adapters.registry.get(n).pool).__name__ for n in MEMBERS}
        params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
        outs = engine.generate(prompts, params, names)
    assert pools == {"FamilyPool"}
    for name, (tokens, margins), out in zip(names, want, outs):
        assert out.adapter == name
        assert matches_reference(out.token_ids, tokens, margins), (name, out.token_ids, tokens, margins)
    # the members are not their LoRAs (rank 6 < 3 x 4): the reference itself tells them apart
    assert len({tuple(t) for (t, _), n in zip(want, names) if n in MEMBERS}) > 1
