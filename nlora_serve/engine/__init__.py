"""The native engine (model runner, paged KV cache, scheduler, sampling, adapter layer) and the
vLLM-backed engine beside it, both behind :class:`nlora_serve.engine.api.Engine`.

Nothing here imports ``nlora_serve.serving`` (the front ends) or their libraries.

Modules, in the order a request meets them::

    api.py             the Engine interface, RequestOutput (one streamed delta), RequestStream, errors
    llm_engine.py      LLMEngine: the native engine's step thread, deltas handed to asyncio; inbox.py:
                       the commands callers send it; slot_wait.py: requests waiting for a LoRA slot
    core.py            EngineCore: add, step (schedule, launch, read back), the one retire path
    request_checks.py  prompt and parameter checks both engines share
    scheduler.py       continuous batching, chunked prefill, preemption; fairness.py: VTC across tenants
    sequence.py        one request's tokens, progress and KV blocks
    block_manager.py   KV blocks and block tables; prefix_cache.py: the same with shared full blocks
    block_tables.py    every sequence's block table in one persistent host tensor
    model_runner.py    ModelRunner: one step's forward, eager or replayed as a CUDA graph
    step_inputs.py     a step's ids, positions and metadata in one host-to-device copy
    batch_info.py      BatchInfo: the attention metadata the model reads
    llama.py           the Llama-family model: AdaptedLinear, DecoderLayer, LlamaModel; rope.py
    attention/         paged attention per device (cpu.py: torch SDPA or native C; cuda.py: Triton)
    adapter_layer.py   AdapterHook: each step's adapter slots, each projection's kernel calls; adapter_step.py: its
                       per-step, per-pool and per-projection records
    step_output.py     sampling on the device and the step's one read-back; sampling.py: the sampler
    detokenizer.py     tokens -> streamed text, stop strings

Around them: config.py (EngineConfig, SchedulerConfig, CacheConfig), kv_cache.py (the cache tensor),
memory.py (how many KV blocks), warmup.py (compile and capture before the first request),
dummy_sampler.py (the sampler's worst case, for both),
cuda_graphs.py (decode graphs), piecewise_graphs.py (prefill and mixed-step graphs),
graph_safety.py (a CPU check that a step can be captured), threads.py and host_memory.py (the
serving process's CPU threads and allocator). ``vllm_backend/``: the same interface on vLLM's
AsyncLLM (DESIGN §8).
"""
