"""Turns a scheduled batch into one forward pass over the packed tokens and returns logits."""

from __future__ import annotations

import torch

from nlora_serve.adapters.runtime.pool import Placement
from nlora_serve.engine.model.batch_info import BatchInfo
from nlora_serve.engine.runner.cuda_graphs import CudaGraphCapture, DecodeGraphs
from nlora_serve.engine.runner.kv_cache import allocate_kv_cache
from nlora_serve.engine.model.adapter_layer import AdapterHook
from nlora_serve.engine.model.llama import Attention, LlamaModel
from nlora_serve.engine.runner.piecewise_graphs import PiecewiseGraphs
from nlora_serve.engine.sample.prompt_logprobs import PromptRows, chunk_rows, score
from nlora_serve.engine.scheduling.scheduler import ScheduledBatch
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.runner.step_inputs import StepInputs
from nlora_serve.models import BaseModel

STEP_COUNTS = ("graph_steps", "piecewise_steps", "eager_steps", "graph_cap_eager_steps", "graph_evictions")


class ModelRunner:
    """The model, its paged KV cache and the per-step input layout."""

    def __init__(self, base: BaseModel, num_blocks: int | None, block_size: int, max_model_len: int,
                 device: torch.device | str = "cpu", prepack: bool = False, gemm=None) -> None:
        """``prepack``: CPU GEMMs on packed weights, for the native ``gemm`` (a loaded
        ``kernels.cpu.gemm.NativeGemm``) where given, else for oneDNN (see :class:`LlamaModel`)."""
        self.device = torch.device(device)
        self.model = LlamaModel(base, max_model_len, self.device, prepack, gemm)
        self.spec, self.dtype = base.spec, base.dtype
        self.block_size = block_size
        self.inputs = StepInputs(block_size, 1, self.device, gather_layout=True)  # reset by set_attention
        self.adapter_hook: AdapterHook | None = None  # the AdapterHook, when adapters are served (see set_adapter_hook)
        self.graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps (enable_graphs)
        self.pieces: PiecewiseGraphs | None = None  # piecewise graphs of prefill / mixed steps (enable_graphs)
        # decode steps replayed / prefill and mixed steps replayed piecewise / all others (of which
        # graph_cap_eager_steps: graphable, but their adapter-pool combination over the graphs' cap) /
        # combinations whose graphs were evicted for a new one (engine/runner/keyed_graphs.py)
        self.step_counts = dict.fromkeys(STEP_COUNTS, 0)
        self._steps = 0  # steps begun (steps_started), the graphs' idle clock
        self.score_chunk_rows = chunk_rows(base.spec.vocab_size, self.device.type)  # prompt rows per lm_head call
        self.kv_cache = None if num_blocks is None else self.allocate_kv_cache(num_blocks)

    def reset_counts(self) -> None:
        """Zero the step counters (graph replays included), e.g. after the engine's warm-up."""
        self.step_counts.update(dict.fromkeys(STEP_COUNTS, 0))
        for graphs in (self.graphs, self.pieces):
            if graphs is not None:
                graphs.replayed = 0

    def allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """(Re)allocate the paged KV cache with ``num_blocks`` blocks on the device."""
        self.kv_cache = None
        self.kv_cache = allocate_kv_cache(self.spec, num_blocks, self.block_size, self.dtype, self.device)
        return self.kv_cache

    def enable_graphs(self, max_num_seqs: int, capture=None, capture_now: bool = False,
                      piecewise_tokens: int = 0) -> None:
        """Replay decode steps of up to ``max_num_seqs`` sequences as CUDA graphs (engine/runner/cuda_graphs.py);
        with ``piecewise_tokens`` (the step budget, > 0), prefill and mixed steps too, as piecewise
        graphs around eager attention (engine/runner/piecewise_graphs.py).

        Needs the Triton attention (its grids do not depend on the step). Reallocates the KV cache
        with one more block, the sink that padded rows write into (the block manager never sees
        it). ``capture``: the seam (default :class:`CudaGraphCapture`; tests pass :class:`EagerCapture`).
        ``capture_now``: capture the no-adapter graphs of every size here (start-up, not serving).
        """
        if self.inputs.gather_layout:
            raise ValueError("CUDA graphs need the Triton attention (kernel_backend 'triton')")
        num_blocks = self.kv_cache.shape[2]
        self.allocate_kv_cache(num_blocks + 1)
        max_blocks = -(-self.model.cos.shape[0] // self.block_size)
        capture = capture if capture is not None else CudaGraphCapture()
        # one logits output for every graph (a step samples its rows before the next step replays);
        # float32 whatever the weights' dtype, as the sampler and the KV budget's dummy sampler assume
        logits = torch.empty(max_num_seqs, self.spec.vocab_size, dtype=torch.float32, device=self.device)
        self.graphs = DecodeGraphs(self.model, self.kv_cache, max_num_seqs, max_blocks, self.inputs.decode_splits,
                                   capture, logits, counts=self.step_counts, clock=self.steps_started)
        self.pieces = (PiecewiseGraphs(self.model, self.kv_cache, piecewise_tokens, max_num_seqs, capture, logits,
                                       counts=self.step_counts, clock=self.steps_started)
                       if piecewise_tokens else None)
        self._share_threshold()
        if capture_now:
            with torch.inference_mode():
                self.graphs.capture_base()
                if self.pieces is not None:
                    self.pieces.capture_base()

    def set_attention(self, attention: Attention, decode_splits: int = 1, gather_layout: bool = True) -> None:
        """See :meth:`LlamaModel.set_attention`; ``decode_splits`` goes into every step's BatchInfo;
        ``gather_layout``: whether ``attention`` reads BatchInfo's gather tables (the torch SDPA one)."""
        self.model.set_attention(attention)
        self.inputs = StepInputs(self.block_size, decode_splits, self.device, gather_layout)

    def release(self, seq: Sequence) -> None:
        """``seq`` ended: free what the runner kept for it across steps (its block-table row)."""
        self.inputs.tables.release(seq)

    def set_layer_ops(self, ops) -> None:
        """Run RMSNorm, RoPE and SiLU · up through the native ``ops`` (kernels/cpu/layer_ops.py) where
        the model's sizes fit them; None, or sizes that do not fit, keep the torch ops."""
        spec = self.spec
        fits = ops is not None and ops.fits(spec.hidden_size, spec.head_dim, spec.intermediate_size)
        self.model.set_layer_ops(ops if fits else None)

    @property
    def decode_splits(self) -> int:
        return self.inputs.decode_splits

    def placement(self) -> Placement:
        """Where adapter pools go: this runner's device, reading its placed (fused) base weights."""
        model = self.model
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        return Placement(self.device, lambda layer, module: model.projection(layer, module).module_weight(module),
                         lambda layer, module: model.projection(layer, module).module_bias(module), stream)

    def set_adapter_hook(self, hook: AdapterHook | None) -> None:
        """See :meth:`LlamaModel.set_adapter_hook`; a per-token-form step's adapter slots ride in the step's copy."""
        self.model.set_adapter_hook(hook)
        self.adapter_hook = hook
        self._share_threshold()

    def _share_threshold(self) -> None:
        """Tell the hook which steps take the per-token adapter form: those the pieces can run."""
        if self.adapter_hook is not None:
            self.adapter_hook.per_token_tokens = self.pieces.sizes[-1] if self.pieces is not None else 0

    @staticmethod
    def order(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """The batch's (sequence, tokens) pairs with single-token sequences first, as BatchInfo needs."""
        pairs = list(zip(batch.seqs, batch.num_tokens))
        return [p for p in pairs if p[1] == 1] + [p for p in pairs if p[1] != 1]

    def prepare(self, pairs: list[tuple[Sequence, int]], previous=None, scored: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, BatchInfo]:
        """``input_ids`` [T], ``positions`` [T] (int64) and the step's :class:`BatchInfo`, on the device
        in one host-to-device copy (:class:`StepInputs`). ``previous``: the step in flight (a
        :class:`~nlora_serve.engine.sample.step_output.SampledStep`) whose tokens placeholders stand for.
        ``scored``: [P] packed indices of prompt positions whose logits follow the sampling rows."""
        hook = self.adapter_hook
        input_ids, positions, info, rows = self.inputs.build(pairs, hook.step_rows() if hook is not None else [],
                                                             previous, scored)
        if hook is not None:
            hook.bind_rows(rows)
        return input_ids, positions, info

    @torch.inference_mode()
    def execute(self, pairs: list[tuple[Sequence, int]], previous=None) -> torch.Tensor:
        """Run one step. Returns [R, V] float32 logits, one row per sampling sequence, in ``pairs`` order.
        ``previous``: see :meth:`prepare`."""
        self.drop_stale_graphs()
        input_ids, positions, info = self.prepare(pairs, previous)
        hook = self.adapter_hook
        graphable, capped = hook is None or hook.graphable(), False
        if (self.graphs is not None and info.num_decodes == len(pairs) and self.graphs.size_for(len(pairs))
                and graphable):
            logits = self.graphs.run(input_ids, positions, info, hook)
            if logits is not None:
                self.step_counts["graph_steps"] += 1
                return logits
            capped = True  # eager, not piecewise: no decode-only step reached the pieces before the cap
        if not capped and self.pieces is not None and self.pieces.size_for(input_ids.shape[0]) and graphable:
            logits = self.pieces.run(input_ids, positions, info, hook)
            if logits is not None:
                self.step_counts["piecewise_steps"] += 1
                return logits
            capped = True
        self.step_counts["eager_steps"] += 1
        self.step_counts["graph_cap_eager_steps"] += int(capped)
        return self.model(input_ids, positions, self.kv_cache, info)

    def drop_stale_graphs(self) -> None:
        """Begin a step: count it on the graphs' idle clock (:meth:`steps_started`) and let go the
        graphs no step can replay again
        (:meth:`~nlora_serve.engine.runner.keyed_graphs.KeyedGraphs.drop_stale`), among them those of
        a pool retired since the last step: the Residency retires a pool on whichever thread
        frees its last adapter, and only this (the step) thread may touch graphs, so it drops them here,
        at the start of its next step, not at its next capture (which may never come)."""
        self._steps += 1  # the graphs' clock (steps_started): every step, whichever graphs it replays
        for graphs in (self.graphs, self.pieces):
            if graphs is not None:
                graphs.drop_stale()

    def steps_started(self) -> int:
        """Steps begun so far (:meth:`execute`, :meth:`execute_scored`): the clock both graph kinds'
        idle rule counts in (keyed_graphs.py), never reset (reset_counts leaves it)."""
        return self._steps

    @torch.inference_mode()
    def execute_scored(self, pairs: list[tuple[Sequence, int]], previous, prompt: PromptRows
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run one step that also scores ``prompt``'s P prompt positions (engine/sample/prompt_logprobs.py).
        Returns the [R, V] float32 logits of :meth:`execute` and the scored rows' read-back parts
        (:func:`~nlora_serve.engine.sample.prompt_logprobs.score`), whose lm_head runs ``score_chunk_rows``
        rows at a time. Eager: the graphs' logits buffers hold one row per sequence (such steps are
        prefills of prompt-logprobs requests only)."""
        self.drop_stale_graphs()
        input_ids, positions, info = self.prepare(pairs, previous, prompt.indices)
        self.step_counts["eager_steps"] += 1
        x = self.model.hidden(input_ids, positions, self.kv_cache, info)  # [T, hidden]
        r = info.logits_indices.numel() - prompt.num_rows  # the sampling rows come first
        logits = self.model.logits(x, info.logits_indices[:r])
        return logits, score(lambda rows: self.model.logits(x, rows), info.logits_indices[r:], prompt,
                             self.score_chunk_rows)
