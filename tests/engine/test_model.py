"""Our Llama forward against transformers: greedy references, long chunked prompts, bf16, the hook."""

from __future__ import annotations

import ctypes
import random

import pytest
import torch

from greedy_rule import matches_reference
from nlora_serve.models import PROJECTIONS, load_base
from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.model.llama import LlamaModel
from nlora_serve.engine.runner.model_runner import ModelRunner
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence

GREEDY_24 = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)  # = HF min_new_tokens


def prefill_logits(base, ids: list[int], hook=None, prepack: bool = False, layer_ops=None) -> torch.Tensor:
    """Last-token logits [V] of one prompt through our runner (in two chunks, so the cache is used);
    ``hook``: a ProjectionHook on the model's projections; ``prepack``, ``layer_ops``: the CPU's
    oneDNN GEMMs and native layer ops (torch ops without)."""
    runner = ModelRunner(base, num_blocks=16, block_size=8, max_model_len=128, prepack=prepack)
    runner.set_layer_ops(layer_ops)
    runner.model.set_adapter_hook(hook)
    blocks = BlockManager(16, 8)
    seq = Sequence("p", 0, list(ids), len(ids), GREEDY_24)
    blocks.grow(seq.block_table, len(ids))
    runner.execute([(seq, 10)])
    seq.num_computed_tokens = 10
    return runner.execute([(seq, len(ids) - 10)])[0]


def test_base_greedy_references_in_one_batch(make_engine, base_greedy):
    refs = base_greedy * 3
    random.Random(0).shuffle(refs)
    engine = make_engine(block_size=8, max_num_batched_tokens=64)  # several prefill chunks
    outs = engine.generate([r["prompt_token_ids"] for r in refs], GREEDY_24)
    for out, ref in zip(outs, refs):
        assert matches_reference(out.token_ids, ref["greedy_token_ids"], ref["top2_logit_margins"])
    assert engine.stats()["kv_blocks_used"] == 0


def hf_greedy(hf_model, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=2)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), margins


def test_long_prompt_chunked_and_preempted_matches_transformers(make_engine, base_fp32, hf_model):
    tok = base_fp32.tokenizer()
    story = " ".join(f"Day {i}: the keeper of lighthouse {i % 7} logged {i * 3} ships and a calm sea."
                     for i in range(60))
    long_ids = tok.encode(story, add_special_tokens=False)[:1040]
    short = [tok.encode(f"Question {i}: name three colours of the rainbow. Answer:", add_special_tokens=False)
             for i in range(2)]
    assert len(long_ids) >= 1000
    # 68 blocks of 16: the long request needs 66 and the two older short ones 2 each, so the long
    # one (newest) is preempted when it runs out, and recomputes after the short ones finish
    engine = make_engine(block_size=16, num_blocks=68, max_num_batched_tokens=128, max_model_len=1060)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
    outs = engine.generate(short + [long_ids], params)
    stats = engine.stats()
    assert stats["preemptions"] >= 1 and stats["kv_blocks_used"] == 0
    for ids, out in zip(short + [long_ids], outs):
        want, margins = hf_greedy(hf_model, ids, 16)
        assert matches_reference(out.token_ids, want, margins)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "prepacked-native-ops"])
def test_bf16_prefill_logits_close_to_fp32(base_fp32, base_greedy, native, native_ops):
    base_bf16 = load_base(str(base_fp32.path), torch.bfloat16)
    for ref in base_greedy:
        fp32 = prefill_logits(base_fp32, ref["prompt_token_ids"])
        bf16 = prefill_logits(base_bf16, ref["prompt_token_ids"], prepack=native,
                              layer_ops=native_ops.layer if native else None)
        assert bf16.dtype == torch.float32
        assert float((bf16 - fp32).norm() / fp32.norm()) < 2e-2


def test_adapter_hook_sees_every_projection_and_its_add_reaches_the_logits(base_fp32, hf_model, base_greedy):
    ids = base_greedy[0]["prompt_token_ids"]
    spec = base_fp32.spec
    delta = torch.randn(spec.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05
    calls = []

    class Hook:  # a ProjectionHook (engine/model/adapter_layer.py)
        defers_tied = False

        def __call__(self, x, y, layer, modules, widths, defer_tied=False):
            assert y.shape == (x.shape[0], sum(widths))
            for module, width in zip(modules, widths):
                calls.append((layer, module))
                assert spec.projection_shape(module) == (width, x.shape[1])
            if (layer, modules) == (spec.num_layers - 1, ("down_proj",)):
                y.add_(delta)

    ours = prefill_logits(base_fp32, ids, Hook())
    assert sorted(set(calls)) == sorted((i, m) for i in range(spec.num_layers) for m in PROJECTIONS)
    assert len(calls) == 2 * 7 * spec.num_layers  # two chunks
    down = hf_model.model.layers[spec.num_layers - 1].mlp.down_proj
    handle = down.register_forward_hook(lambda mod, inp, out: out + delta)
    try:
        with torch.inference_mode():
            want = hf_model(torch.tensor([ids])).logits[0, -1]
    finally:
        handle.remove()
    assert torch.allclose(ours, want, atol=2e-3, rtol=0)
    assert not torch.allclose(prefill_logits(base_fp32, ids), want, atol=2e-3, rtol=0)


def test_fp32_native_layer_ops_and_prepacked_gemms_match_the_torch_ops(base_fp32, base_greedy, native_ops):
    """The CPU's fast path (oneDNN-prepacked GEMMs, native RMSNorm / RoPE / SiLU · up) against
    the torch ops (which the tests above hold to transformers), through the whole 30-layer model."""
    for ref in base_greedy[:3]:
        plain = prefill_logits(base_fp32, ref["prompt_token_ids"])
        fast = prefill_logits(base_fp32, ref["prompt_token_ids"], prepack=True, layer_ops=native_ops.layer)
        assert float((fast - plain).norm() / plain.norm()) < 1e-5
        assert int(fast.argmax()) == int(plain.argmax())


def test_model_prepacks_only_when_asked(base_fp32):
    plain = LlamaModel(base_fp32, 64, "cpu")
    packed = LlamaModel(base_fp32, 64, "cpu", prepack=True)
    assert plain.layers[0].qkv.packed is None and plain.lm_head_packed is None
    assert all(p.packed is not None for layer in packed.layers for p in layer.projections())
    assert packed.lm_head_packed is not None
    # the plain weight stays the one adapters read (tied A/B are its slices)
    assert packed.layers[0].qkv.weight.data_ptr() == packed.layers[0].qkv.module_weight("q_proj").data_ptr()


def test_models_on_one_base_share_its_fused_and_packed_weights(base_fp32, native_ops):
    """Built once per base, device and packing (``BaseModel.derived``): a second engine's model takes
    the first's tensors, never a copy (an engine loads its own native library handle: the same file);
    another packing builds its own. That shared weights compute what fresh ones do: the prepacked
    tests above, each of whose models after the first takes them."""
    first = LlamaModel(base_fp32, 64, "cpu", prepack=True, gemm=native_ops.gemm)
    second = LlamaModel(base_fp32, 64, "cpu", prepack=True, gemm=type(native_ops.gemm)(ctypes.CDLL(
        native_ops.gemm.library)))
    onednn, plain = LlamaModel(base_fp32, 64, "cpu", prepack=True), LlamaModel(base_fp32, 64, "cpu")
    pairs = [(p, q) for a, b in zip(first.layers, second.layers) for p, q in zip(a.projections(), b.projections())]
    assert len(pairs) == 4 * base_fp32.spec.num_layers
    assert all(p.weight is q.weight and p.packed is q.packed and p.bias is q.bias for p, q in pairs)
    assert first.lm_head_packed is second.lm_head_packed is not None
    assert all(p.packed is not q.packed for layer, other in zip(first.layers, onednn.layers)
               for p, q in zip(layer.projections(), other.projections()))
    assert plain.layers[0].qkv.packed is None and plain.layers[0].qkv.weight is not first.layers[0].qkv.weight

