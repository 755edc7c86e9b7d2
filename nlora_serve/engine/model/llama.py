"""Our own Llama-family forward (Llama, Mistral, Qwen2, Qwen3 layout) over a packed ragged batch.

Built from :class:`nlora_serve.models.BaseModel` weights; no transformers modules. Every one of a
layer's seven projections goes through :class:`AdaptedLinear`, where the engine plugs the adapter
kernels' dispatch in (DESIGN §4). q/k/v and gate/up are fused into one GEMM each; the hook still
sees each module's own output columns. Qwen3 RMS-normalises each q and k head after the projection
(adapters included, as PEFT on transformers' Qwen3Attention) and before RoPE (:func:`head_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora_serve.engine.model.adapter_layer import ProjectionHook
from nlora_serve.engine.model.attention import paged_attention
from nlora_serve.engine.model.batch_info import BatchInfo
from nlora_serve.kernels.cpu.gemm import NativeGemm, NativeLinear, PackedLinear, can_prepack
from nlora_serve.engine.model.rope import apply_rope, rope_config, rope_tables
from nlora_serve.kernels.cpu.layer_ops import LayerOps
from nlora_serve.kernels.cpu.tied_delta import TiedDelta
from nlora_serve.errors import ModelError
from nlora_serve.models import BaseModel, ModelSpec

# attention(q [T, H, D], k, v [T, KVH, D], kv_layer [2, NB, BS, KVH, D], info, scale) -> [T, H * D]:
# writes this step's K/V into kv_layer, then attends (engine/model/attention/, one module per device)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, BatchInfo, float], torch.Tensor]


class AdaptedLinear:
    """One or more projections of a layer sharing an input: ``y = x @ W.T (+ b)``, then the hook.

    ``adapter_hook`` is None while no adapter is installed: then only the base GEMM runs. When set,
    it is called once per call with the fused ``y`` and each module's width, and adds the
    adapters' deltas into it in place (the engine sets it to its
    :class:`~nlora_serve.engine.model.adapter_layer.AdapterHook`; that module's docstring traces which
    kernel adds what on each backend).
    ``prepack``: on the CPU, run the GEMM on a packed copy of the weight: for the native GEMM
    (``gemm``, cpu/gemm.c) where it runs the dtype, else for oneDNN
    (kernels/cpu/gemm.py); ``weight`` stays the plain tensor the adapters read.
    ``built``: where the fused weight, bias and packed copy are kept by ``(layer_idx, modules)``
    (a :class:`LlamaModel`'s entry of ``BaseModel.derived``): an engine built on the same base, device
    and packing takes them from there instead of building its own (they are never written).
    """

    __slots__ = ("weight", "bias", "packed", "layer_idx", "modules", "widths", "adapter_hook")

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], layer_idx: int,
                 modules: tuple[str, ...], device: torch.device, prepack: bool = False,
                 gemm: NativeGemm | None = None, built: dict | None = None) -> None:
        made = None if built is None else built.get((layer_idx, modules))
        if made is None:
            fused = torch.cat(weights) if len(weights) > 1 else weights[0]
            weight = fused.to(device).contiguous()  # [out, in] on the engine's device
            bias = torch.cat(biases).to(device) if all(b is not None for b in biases) else None  # [out]
            made = weight, bias, packed_linear(weight, bias, prepack, gemm)
            if built is not None:
                built[(layer_idx, modules)] = made
        self.weight, self.bias, self.packed = made
        self.layer_idx = layer_idx
        self.modules = modules
        self.widths = [w.shape[0] for w in weights]  # output columns of each module, in order
        self.adapter_hook: ProjectionHook | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, in] -> ``y`` [T, out], in the weight's dtype."""
        y = F.linear(x, self.weight, self.bias) if self.packed is None else self.packed(x)
        if self.adapter_hook is not None:
            self.adapter_hook(x, y, self.layer_idx, self.modules, self.widths)
        return y

    def deferred(self, x: torch.Tensor) -> tuple[torch.Tensor, TiedDelta | None]:
        """As a call, but the tied adapters' delta may come back unadded, for the native op that
        reads ``y`` next to add (``ProjectionHook.defers_tied``; kernels/cpu/layer_ops.py): ``(y, delta)``,
        delta None when every delta is in ``y``. When the hook defers, and when it adds instead:
        engine/model/adapter_layer.py's module docstring."""
        y = F.linear(x, self.weight, self.bias) if self.packed is None else self.packed(x)
        hook = self.adapter_hook
        if hook is None:
            return y, None
        if hook.defers_tied:
            return y, hook(x, y, self.layer_idx, self.modules, self.widths, defer_tied=True)
        hook(x, y, self.layer_idx, self.modules, self.widths)
        return y, None

    def module_weight(self, module: str) -> torch.Tensor:
        """One module's ``[out, in]`` rows of the fused weight (a view, no copy)."""
        i = self.modules.index(module)
        start = sum(self.widths[:i])
        return self.weight[start:start + self.widths[i]]

    def module_bias(self, module: str) -> torch.Tensor | None:
        """One module's slice of the fused bias (a view), or None without a bias."""
        if self.bias is None:
            return None
        i = self.modules.index(module)
        start = sum(self.widths[:i])
        return self.bias[start:start + self.widths[i]]


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool,
                  gemm: NativeGemm | None = None) -> NativeLinear | PackedLinear | None:
    """``weight`` packed once when asked: for the native GEMM where ``gemm`` is given and runs the
    dtype here, else prepacked for oneDNN where possible; None: F.linear on the plain weight."""
    if not prepack:
        return None
    if gemm is not None and weight.device.type == "cpu" and gemm.supports(weight.dtype):
        return NativeLinear(weight, bias, gemm)
    return PackedLinear(weight, bias) if can_prepack(weight) else None


def head_norm(qk: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's q/k norm: each head of ``qk`` [T, heads, D] (any float dtype; rows may be strided)
    RMS-normalised over its D elements in float32, times its row of ``weight`` [heads, D] float32
    (q_norm's row for the query heads, k_norm's for the key heads). Returns a new [T, heads, D]
    float32 tensor; ``qk`` is not changed."""
    return F.rms_norm(qk.float(), qk.shape[-1:], None, eps).mul_(weight)


def qk_norm_rows(base: BaseModel, layer: int, device: torch.device) -> torch.Tensor | None:
    """Layer ``layer``'s q_norm weight repeated per query head, then k_norm's per key head:
    [H + KVH, D] float32 on ``device``, for :func:`head_norm`; None for a model without q/k norms.

    Raises:
        ModelError: the spec asks for them (Qwen3) and the checkpoint lacks one, or one is not [D].
    """
    spec = base.spec
    if not spec.qk_norm:
        return None
    rows = []
    for name, heads in zip(ModelSpec.qk_norm_paths(layer), (spec.num_heads, spec.num_kv_heads)):
        weight = base.weights.get(name)
        if weight is None or tuple(weight.shape) != (spec.head_dim,):
            found = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
            raise ModelError(f"{base.path}: {spec.architecture} needs {name} of shape ({spec.head_dim},) "
                             f"(head_dim), {found}")
        rows.append(weight.float().expand(heads, -1))
    return torch.cat(rows).to(device)


class DecoderLayer:
    """Pre-norm attention + SiLU-gated MLP, each with a residual connection (Qwen3: q/k head norms)."""

    def __init__(self, base: BaseModel, layer: int, eps: float, device: torch.device, prepack: bool = False,
                 gemm: NativeGemm | None = None, built: dict | None = None) -> None:
        w, spec = base.weights, base.spec
        prefix = f"model.layers.{layer}"
        # every projection's bias where the checkpoint has one: Qwen2's q/k/v, and Llama's q/k/v/o
        # with attention_bias and gate/up/down with mlp_bias (transformers' LlamaAttention / LlamaMLP)
        def bias(*modules: str) -> list[torch.Tensor | None]:
            return [w.get(f"{ModelSpec.module_path(layer, m)}.bias") for m in modules]

        def linear(*modules: str) -> AdaptedLinear:
            return AdaptedLinear([base.weight(layer, m) for m in modules], bias(*modules), layer, modules, device,
                                 prepack, gemm, built)

        self.qkv = linear("q_proj", "k_proj", "v_proj")
        self.o_proj = linear("o_proj")
        self.gate_up = linear("gate_proj", "up_proj")
        self.down_proj = linear("down_proj")
        self.input_norm = w[f"{prefix}.input_layernorm.weight"].float().to(device)
        self.post_norm = w[f"{prefix}.post_attention_layernorm.weight"].float().to(device)
        self.qk_norm = qk_norm_rows(base, layer, device)  # [H + KVH, D] float32, or None
        self.eps = eps
        self.dtype = base.dtype
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.attention: Attention = paged_attention  # set by LlamaModel.set_attention
        self.ops: LayerOps | None = None  # native elementwise ops (set by LlamaModel.set_layer_ops)

    def projections(self) -> tuple[AdaptedLinear, ...]:
        return self.qkv, self.o_proj, self.gate_up, self.down_proj

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor,
                 info: BatchInfo, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Residual ``x`` [T, hidden] float32 -> float32; writes this step's K/V into ``kv_layer``.

        ``cos``, ``sin``: the torch path's per-token [T, 1, D] rows; with native ops, the whole
        [max_len, D] tables and ``positions`` [T] (the op indexes them itself).
        The residual stream and the norms stay in float32 (only GEMM inputs are cast to the
        compute dtype): in bf16 that halves the logit error against fp32 for ~1% of the time.
        """
        if self.ops is not None:
            return self._native(x, cos, sin, kv_layer, info, positions)
        qk, v = self.attention_inputs(x, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        return self.attention_output(x, self.attention(q, k, v, kv_layer, info, self.scale))

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         qk_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to attention (torch path): RMSNorm, q/k/v projection (adapters included),
        the q/k head norms (Qwen3), RoPE.

        Returns ``qk`` [T, H + KVH, D] (queries then keys, rotated; ``qk_out`` when given) and
        ``v`` [T, KVH, D] (a view of the projection's output), in the compute dtype. The head
        norms' float32 output is rotated as it is and rounded once, after RoPE.
        """
        t, hd = x.shape[0], self.head_dim
        qkv = self.qkv(F.rms_norm(x, x.shape[-1:], self.input_norm, self.eps).to(self.dtype))
        nq = self.num_heads + self.num_kv_heads
        qk = qkv[:, : nq * hd].view(t, nq, hd)
        if self.qk_norm is not None:
            qk = head_norm(qk, self.qk_norm, self.eps)
        qk = apply_rope(qk, cos, sin, qk_out)  # q and k heads rotated together
        return qk.to(self.dtype), qkv[:, nq * hd:].view(t, self.num_kv_heads, hd)

    def attention_output(self, x: torch.Tensor, attn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer after attention (torch path): o_proj + residual, RMSNorm, SiLU-gated MLP + residual.

        ``x`` [T, hidden] float32 residual, ``attn`` [T, H * D]; returns the new residual [T, hidden]
        float32 (written into ``out`` when given, which may be ``x`` itself: it is read before).
        """
        h = x + self.o_proj(attn)
        normed = F.rms_norm(h, h.shape[-1:], self.post_norm, self.eps).to(self.dtype)
        gate, up = self.gate_up(normed).chunk(2, dim=-1)
        return torch.add(h, self.down_proj(F.silu(gate) * up), out=out)

    def _native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor,
                info: BatchInfo, positions: torch.Tensor) -> torch.Tensor:
        """The same maths with the elementwise work in the native ops, one pass each; ``x`` is
        updated in place (the residual stream is this forward's own tensor). The tied adapters'
        deltas of q/k/v, o, gate/up and down are added by the ops that read those outputs (their
        rows kept in fp32 there: one bf16 rounding less than adding them into the output). With
        q/k head norms (Qwen3) every q/k/v delta is added by the projection (the norms read the
        adapted q and k) and the normed heads are written back in place (in bf16, one rounding
        before RoPE's) for the native RoPE."""
        ops, t, hd = self.ops, x.shape[0], self.head_dim
        normed = ops.add_rms_norm(x, None, self.input_norm, self.eps, self.dtype)
        nq = self.num_heads + self.num_kv_heads
        if self.qk_norm is None:
            qkv, qkv_tied = self.qkv.deferred(normed)
        else:
            qkv, qkv_tied = self.qkv(normed), None
            qk = qkv[:, : nq * hd].view(t, nq, hd)
            qk.copy_(head_norm(qk, self.qk_norm, self.eps))
        # in place; a tied delta is added to the whole q/k/v row first (v written back with it)
        qk = ops.rope(qkv[:, : nq * hd].view(t, nq, hd), positions, cos, sin, qkv_tied)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, nq * hd:].view(t, self.num_kv_heads, hd)
        o, o_tied = self.o_proj.deferred(self.attention(q, k, v, kv_layer, info, self.scale))
        normed = ops.add_rms_norm(x, o, self.post_norm, self.eps, self.dtype, o_tied)
        gate_up, gate_up_tied = self.gate_up.deferred(normed)
        down, down_tied = self.down_proj.deferred(ops.silu_mul(gate_up, gate_up_tied))
        return x.add_(down) if down_tied is None else ops.add(x, down, down_tied)


class LlamaModel:
    """The whole stack: embeddings, decoder layers, final norm, (tied) lm_head.

    ``prepack``: on the CPU, every GEMM (the lm_head too) runs on packed weights
    (kernels/cpu/gemm.py): for the native GEMM ``gemm`` where given and it runs the dtype here,
    else prepacked for oneDNN; off the CPU, or with a dtype neither can take, it is ignored.
    """

    def __init__(self, base: BaseModel, max_len: int, device: torch.device | str = "cpu",
                 prepack: bool = False, gemm: NativeGemm | None = None) -> None:
        rope, eps = rope_config(base.path / "config.json")
        device = torch.device(device)
        self.spec = base.spec
        self.device = device
        self.embed = base.weights["model.embed_tokens.weight"].to(device)  # [V, hidden]
        self.lm_head = self.embed if base.spec.tie_word_embeddings else base.weights["lm_head.weight"].to(device)
        # the fused and packed weights, built once per base, device and packing: every engine on
        # one base (a bench's side by side, the test suite's hundreds) shares them. SmolLM2 fp32 on the
        # CPU: 0.4 s and ~0.6 GB each otherwise, ~110 CPU-s of the suite (py-spy, round two session 24)
        packing = (prepack, None if gemm is None else Path(gemm.library).name)  # named by its sources' hash
        built = base.derived.setdefault(("engine.llama.projections", device, packing), {})
        if "lm_head" not in built:
            built["lm_head"] = packed_linear(self.lm_head, None, prepack, gemm)
        self.lm_head_packed = built["lm_head"]
        self.norm = base.weights["model.norm.weight"].float().to(device)
        self.eps = eps
        self.layers = [DecoderLayer(base, i, eps, device, prepack, gemm, built) for i in range(base.spec.num_layers)]
        self.cos, self.sin = (t.to(device) for t in rope_tables(base.spec.head_dim, max_len, rope))
        self.dtype = base.dtype
        self.layer_ops: LayerOps | None = None

    def set_attention(self, attention: Attention) -> None:
        """Run every layer's attention through ``attention`` (engine/model/attention/, per device)."""
        for layer in self.layers:
            layer.attention = attention

    def set_layer_ops(self, ops: LayerOps | None) -> None:
        """Run every layer's RMSNorm, RoPE and SiLU · up through the native ``ops`` (None: torch)."""
        self.layer_ops = ops
        for layer in self.layers:
            layer.ops = ops

    def projection(self, layer: int, module: str) -> AdaptedLinear:
        """The (fused) projection of ``layer`` that computes ``module``."""
        return next(p for p in self.layers[layer].projections() if module in p.modules)

    def set_adapter_hook(self, hook: ProjectionHook | None) -> None:
        """Install ``hook`` on all seven projections of every layer (None removes it)."""
        for layer in self.layers:
            for proj in layer.projections():
                proj.adapter_hook = hook

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 info: BatchInfo) -> torch.Tensor:
        """Logits of the sampling tokens.

        Args:
            input_ids, positions: [T] int64. kv_cache: [layers, 2, NB, BS, KVH, D].
        Returns:
            [R, V] float32 logits for ``info.logits_indices``.
        """
        return self.logits(self.hidden(input_ids, positions, kv_cache, info), info.logits_indices)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
               info: BatchInfo) -> torch.Tensor:
        """The decoder stack without the head: the residual stream [T, hidden] float32 after the
        last layer (arguments as :meth:`__call__`), for :meth:`logits` on any of its rows."""
        x = F.embedding(input_ids, self.embed).float()  # the residual stream, float32
        if self.layer_ops is not None:  # the native RoPE indexes the tables itself
            cos, sin = self.cos, self.sin
        else:
            cos = self.cos[positions].unsqueeze(1)  # [T, 1, D] float32
            sin = self.sin[positions].unsqueeze(1)
        for layer, kv_layer in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, kv_layer, info, positions)
        return x

    def logits(self, x: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final RMSNorm and lm_head on rows ``indices`` [R] int64 of the residual ``x`` [T, hidden]
        float32. Returns [R, V] float32: ``out`` (written) when given, the graphs' shared output
        buffer (the float32 conversion writes it: no extra copy), else a new tensor."""
        last = F.rms_norm(x[indices], x.shape[-1:], self.norm, self.eps).to(self.dtype)
        logits = F.linear(last, self.lm_head) if self.lm_head_packed is None else self.lm_head_packed(last)
        return logits.float() if out is None else out.copy_(logits)
