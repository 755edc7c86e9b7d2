"""Qwen3 (dense) against transformers: the Llama layout plus a per-head RMSNorm of q and of k after
the projection (adapters included) and before RoPE, and a ``head_dim`` that is not hidden / heads.

A tiny random Qwen3 (head_dim 32, hidden 64 over 4 heads) with q_norm / k_norm weights drawn away
from 1 (transformers starts them at 1: q and k swapped, or one norm missing, would then show):
last-token logits of the torch and the native CPU layer ops against transformers', tied and untied
embeddings; greedy tokens and prompt log-probabilities of the engine (native ops, torch ops) for a
base, a LoRA tenant against PEFT on transformers' model and a tied IntTune tenant against
transformers on weights merged in float64; greedy tokens of the CUDA path (Triton kernels under the
interpreter) for the base and tied ones; the CUDA path's graph piece with the norms under the
graph-safety check.
"""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined (test_device_path.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import hf_greedy, make_tiny_qwen3, merged, random_factors, write_peft  # noqa: E402
from nlora_serve.engine.scheduling.block_manager import BlockManager  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture  # noqa: E402
from nlora_serve.engine.model.llama import LlamaModel, qk_norm_rows  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.runner.model_runner import ModelRunner  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402
from nlora_serve.engine.scheduling.sequence import Sequence  # noqa: E402
from nlora_serve.errors import ModelError  # noqa: E402
from nlora_serve.models import load_base, read_spec  # noqa: E402
from nlora_serve.models.base import sliding_window  # noqa: E402
from nlora_serve.models.dummy import dummy_weights  # noqa: E402

RANK, ALPHA, NEW_TOKENS = 4, 8.0, 4


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """{tie_word_embeddings: (model folder, transformers model)}, built on first use."""
    root, made = tmp_path_factory.mktemp("qwen3"), {}

    def get(tie: bool):
        if tie not in made:
            made[tie] = (root / f"tie-{tie}", make_tiny_qwen3(root / f"tie-{tie}", tie=tie))
        return made[tie]
    return get


@pytest.fixture(scope="module")
def tenants(qwen3, tmp_path_factory):
    """The tied model's tenants: {name: (folder, reference model)}: LoRA through PEFT, IntTune merged."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("qwen3-tenants")
    _, model = qwen3(True)
    lora = write_peft(root / "lora", random_factors(model, rank=RANK, with_n=False, seed=2, scale=0.2),
                      rank=RANK, alpha=ALPHA)
    tied = random_factors(model, rank=RANK, tied=True, with_n=True, seed=1)
    return {"lora": (lora, PeftModel.from_pretrained(copy.deepcopy(model), str(lora)).eval()),
            "tied": (write_peft(root / "tied", tied, rank=RANK, alpha=ALPHA),
                     merged(model, tied, rank=RANK, alpha=ALPHA))}


def _prefill_logits(base, ids: list[int], layer_ops) -> torch.Tensor:
    """Last-token logits [V] of one prompt in two chunks (the second reads the first's K/V)."""
    runner = ModelRunner(base, num_blocks=8, block_size=8, max_model_len=64, prepack=layer_ops is not None)
    runner.set_layer_ops(layer_ops)
    blocks = BlockManager(8, 8)
    seq = Sequence("p", 0, list(ids), len(ids), SamplingParams(max_tokens=1))
    blocks.grow(seq.block_table, len(ids))
    runner.execute([(seq, 7)])
    seq.num_computed_tokens = 7
    return runner.execute([(seq, len(ids) - 7)])[0]


@pytest.mark.parametrize("tie", [True, False], ids=["tied-embeddings", "lm-head"])
def test_prefill_logits_of_torch_and_native_layer_ops_equal_transformers(qwen3, tie, native_ops):
    # before: Qwen3ForCausalLM was refused (ModelError); a forward without the q/k norms, or with
    # q_norm and k_norm swapped, is off by O(1) in these logits
    folder, model = qwen3(tie)
    base = load_base(str(folder))
    assert (base.spec.qk_norm, base.spec.head_dim, base.spec.tie_word_embeddings) == (True, 32, tie)
    ids = torch.randint(3, 49152, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0, -1]
    for layer_ops in (None, native_ops.layer):
        got = _prefill_logits(base, ids, layer_ops)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (layer_ops, float((got - want).abs().max()))
    if tie:  # bf16 (the head norms in fp32, rounded with RoPE's output): test_model.py's bound on the
        # distance to fp32; measured 7.0e-3 (torch), 8.5e-3 (native), transformers in bf16 8.0e-3
        bf16 = load_base(str(folder), torch.bfloat16)
        for layer_ops in (None, native_ops.layer):
            got = _prefill_logits(bf16, ids, layer_ops)
            assert got.dtype == torch.float32 and float((got - want).norm() / want.norm()) < 2e-2, layer_ops


def _check_prompt_logprobs(ref, prompt: list[int], got) -> None:
    """Each prompt token's log-probability (prompt_logprobs=1) equals the reference model's."""
    with torch.inference_mode():
        rows = ref(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
    assert len(got) == len(prompt) and got[0] is None
    for p, scored in enumerate(got[1:]):
        token = prompt[p + 1]
        assert scored.logprobs[token] == pytest.approx(float(rows[p, token]), abs=1e-4), p


@pytest.mark.parametrize("kernel_backend", ["native", "torch", "triton"])
def test_greedy_tokens_and_prompt_logprobs_of_base_lora_and_tied_tenants_equal_transformers(
        qwen3, tenants, base_model_dir, tmp_path, kernel_backend):
    folder, model = qwen3(True)
    gen = torch.Generator().manual_seed(3)
    jobs = [(name, torch.randint(3, 49152, (length,), generator=gen).tolist())
            for name, length in ((None, 5), ("lora", 12), ("tied", 19))]
    new_tokens, budget = NEW_TOKENS, 32  # two prefill chunks, then decode steps
    if kernel_backend == "triton":  # CI time: no LoRA tenant, whose kernels cost ~2 s under the
        # interpreter and see nothing of the model (test_device_path.py); one prefill and one decode
        # step, eager (graphs under the safety check cost ~6 s more: see the graph test below)
        jobs, new_tokens, budget = [jobs[0], jobs[2]], 2, 64
    config = EngineConfig(model=str(folder), tokenizer=str(base_model_dir), device="cpu", kernel_backend=kernel_backend,
                          adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=64),
                          cache=CacheConfig(block_size=8, num_blocks=32))
    params = [SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0,
                             prompt_logprobs=None if name is None else 1) for name, _ in jobs]
    with LLMEngine(config) as engine:
        for name, (adapter, _) in tenants.items():
            engine.adapters.register_dir(name, adapter)
        outs = engine.generate([p for _, p in jobs], params, [n for n, _ in jobs])
        if kernel_backend == "native":  # alone in its steps, the tied delta of q/k/v is one the native
            # RoPE could add (after the head norms: wrong); the projection must add it before them
            outs.append(engine.generate([jobs[2][1]], [params[2]], ["tied"])[0])
            jobs.append(jobs[2])
    for (name, prompt), out in zip(jobs, outs):
        ref = model if name is None else tenants[name][1]
        want, margins = hf_greedy(ref, prompt, new_tokens)
        assert matches_reference(out.token_ids, want, margins), (name, out.token_ids, want)
        if name is not None:
            _check_prompt_logprobs(ref, prompt, out.prompt_logprobs)


def test_the_head_norms_are_safe_to_capture_in_a_graph_piece(qwen3):
    """The CUDA path's piece before attention (piecewise_graphs.py) with the q/k norms, captured and
    replayed under the graph-safety check (no sync, no read of a tensor the capture did not read),
    on new inputs written into its static buffers: the replay equals an eager call."""
    folder, _ = qwen3(True)
    model = LlamaModel(load_base(str(folder)), max_len=64)
    layer, gen = model.layers[0], torch.Generator().manual_seed(7)
    # the piece's static buffers: residual, positions' RoPE rows, rotated q/k heads (H + KVH = 6)
    x, cos, sin, qk = torch.zeros(8, 64), torch.zeros(8, 1, 32), torch.zeros(8, 1, 32), torch.zeros(8, 6, 32)
    capture = EagerCapture(check=True)
    replay, out = capture.capture(lambda: layer.attention_inputs(x, cos, sin, qk_out=qk)[0])
    pos = torch.arange(3, 11)
    x.copy_(torch.randn(8, 64, generator=gen))
    cos.copy_(model.cos[pos].unsqueeze(1))
    sin.copy_(model.sin[pos].unsqueeze(1))
    replay()
    want, _ = layer.attention_inputs(x.clone(), cos.clone(), sin.clone())
    assert capture.checked_ops > 0 and torch.equal(out, want)


def _config(tmp_path, **fields):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 2, "hidden_size": 1024,
           "intermediate_size": 3072, "vocab_size": 128, "tie_word_embeddings": True, **fields}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_qwen3_spec_reads_head_dim_and_qk_norm_and_qwen3_moe_is_refused(tmp_path):
    _config(tmp_path)  # Qwen3-0.6B's shape: head_dim 128, not 1024 / 16
    spec = read_spec(tmp_path)
    assert (spec.architecture, spec.head_dim, spec.qk_norm, spec.attention_bias) == ("Qwen3ForCausalLM", 128, True, False)
    assert spec.projection_shape("q_proj") == (2048, 1024)
    weights = dummy_weights(tmp_path, spec, torch.float32)
    assert weights["model.layers.1.self_attn.k_norm.weight"].shape == (128,)
    _config(tmp_path, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    with pytest.raises(ModelError, match="Qwen3MoeForCausalLM.*is not supported"):
        read_spec(tmp_path)


def test_qwen3_sliding_window_follows_use_sliding_window_as_qwen2(tmp_path):
    # Qwen3's config keeps a sliding_window with use_sliding_window false (no layer slides): before,
    # only Qwen2 read use_sliding_window, and such a Qwen3 was refused past the window
    base = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "sliding_window": 16,
            "num_hidden_layers": 2}
    assert sliding_window({**base, "use_sliding_window": False, "max_window_layers": 0}) is None
    assert sliding_window({**base, "use_sliding_window": True, "max_window_layers": 1}) == 16


def test_a_qwen3_checkpoint_without_its_head_norms_is_refused_by_name(tmp_path):
    _config(tmp_path)
    spec = read_spec(tmp_path)
    base = SimpleNamespace(spec=spec, path=tmp_path, weights={"model.layers.0.self_attn.q_norm.weight": torch.ones(128)})
    with pytest.raises(ModelError, match=r"needs model.layers.0.self_attn.k_norm.weight of shape \(128,\).*missing"):
        qk_norm_rows(base, 0, torch.device("cpu"))
    base.weights["model.layers.0.self_attn.k_norm.weight"] = torch.ones(64)
    with pytest.raises(ModelError, match=r"k_norm.weight of shape \(128,\).*of shape \(64,\)"):
        qk_norm_rows(base, 0, torch.device("cpu"))
