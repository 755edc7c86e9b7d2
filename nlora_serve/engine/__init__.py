"""The native engine (model runner, paged KV cache, scheduler, sampling, adapter layer) and the
vLLM-backed engine beside it, both behind :class:`nlora_serve.engine.api.Engine`.

Nothing here imports ``nlora_serve.serving`` (the front ends) or their libraries.

Modules, one line each, in the order a request meets them::

    api.py               the Engine interface, RequestOutput (one streamed delta), RequestStream, errors
    llm_engine.py        LLMEngine: the native engine's callers' side (submit, abort, admin calls)
    step_thread.py       StepThread: the thread that steps the core, its inbox, sinks and watchdog
    inbox.py             the commands callers send the step thread, run between steps
    slot_wait.py         requests waiting for a LoRA slot
    step_watchdog.py     a step that runs past a limit makes the engine dead
    request_checks.py    prompt and parameter checks both engines share
    core.py              EngineCore: add, step (schedule, launch, read back), the one retire path
    request_state.py     RequestState: what the core keeps per request; new_request, its RequestOutput deltas
    sequence.py          Sequence: one request's tokens, progress and KV blocks, as the scheduler sees them
    scheduler.py         continuous batching, chunked prefill, preemption
    fairness.py          VTC: fair scheduling across tenants
    block_manager.py     KV blocks: a free list and per-sequence block tables
    prefix_cache.py      the block manager with shared full blocks (prefix caching)
    cache_shares.py      which tenant gives up a cached block under fair scheduling
    model_runner.py      ModelRunner: one step's forward, eager or replayed as a CUDA graph
    block_tables.py      every sequence's block table in one persistent host tensor
    step_inputs.py       a step's ids, positions and metadata in one host-to-device copy
    device_values.py     small host lists onto the device without a stream sync
    batch_info.py        BatchInfo: the attention metadata the model reads
    llama.py             the Llama-family model: AdaptedLinear, DecoderLayer, LlamaModel
    rope.py              rotary position embeddings, as transformers computes them
    attention/           paged attention per device (cpu.py: torch SDPA or native C; cuda.py: Triton)
    adapter_layer.py     AdapterHook: each step's adapter slots, each projection's kernel calls
    adapter_step.py      the hook's per-step, per-pool and per-projection records
    step_output.py       sampling on the device and the step's one read-back (SampledStep)
    sampling.py          SamplingParams and the batched sampler
    token_masks.py       allowed_token_ids and bad_words masks
    structured.py        structured outputs: the spec (StructuredOutputs), its token masks
    grammar_compiler.py  specs compiled by xgrammar within a timeout, per-tenant slots, their cache
    prompt_logprobs.py   prompt log-probabilities: which prompt positions a step scores, their read-back
    eos.py               a request's EOS and stop token ids, as vLLM takes them
    detokenizer.py       tokens -> streamed text, stop strings

Around them (start-up, memory and threads)::

    config.py            EngineConfig, SchedulerConfig, CacheConfig
    runner_setup.py      the model runner at start-up: kernels, attention, KV cache size, CUDA graphs
    memory.py            how many KV blocks the engine gets
    kv_cache.py          the paged KV cache tensor
    warmup.py            compile and capture before the first request
    dummy_sampler.py     the sampler's worst case, for memory.py and warmup.py
    cuda_graphs.py       decode steps as CUDA graphs
    piecewise_graphs.py  prefill and mixed steps as piecewise CUDA graphs
    graph_safety.py      a CPU check that a step can be captured
    threads.py           torch's CPU threads belong to the step thread
    thread_priority.py   per-thread nice values: a long grammar compile yields the CPU to the step thread
    host_memory.py       the serving process's C allocator
    vllm_backend/        the same Engine interface on vLLM's AsyncLLM (DESIGN §8)
"""
