"""The native engine (model runner, paged KV cache, scheduler, sampling, adapter layer) and the
vLLM-backed engine beside it, both behind :class:`nlora_serve.engine.api.Engine`.

Nothing here imports ``nlora_serve.serving`` (the front ends) or their libraries.

Its folders, one concern each, in the order a step meets them (each ``__init__.py`` maps its files)::

    scheduling/          which sequences run this step and the KV blocks they hold: continuous
                         batching, chunked prefill, preemption, fair (VTC) scheduling, prefix caching
    runner/              the model runner: a step's inputs onto the device, the KV cache, CUDA graphs;
                         at start-up the KV cache size and the warm-up
    model/               the Llama-family model the runner calls: BatchInfo (the attention metadata it
                         reads), RoPE, attention per device, the adapter layer
    sample/              a step's logits to tokens and log-probabilities: SamplingParams, the batched
                         sampler, token masks, prompt log-probabilities, the step's one read-back
    structured_output/   structured outputs: the spec, its grammar compiled by xgrammar, its masks
    vllm_backend/        the same Engine interface on vLLM's AsyncLLM (DESIGN §8)

The modules here: the caller-facing engine and its step loop, in the order a request meets them::

    api.py               the Engine interface, RequestOutput (one streamed delta), RequestStream, errors
    llm_engine.py        LLMEngine: the native engine's callers' side (submit, abort, admin calls)
    request_checks.py    prompt and parameter checks both engines share, run on the caller's thread
    step_thread.py       StepThread: the thread that steps the core, its inbox, sinks and watchdog
    inbox.py             the commands callers send the step thread, run between steps
    slot_wait.py         requests waiting for a LoRA slot
    step_watchdog.py     a step that runs past a limit makes the engine dead
    core.py              EngineCore: add, step (schedule, launch, read back), the one retire path
    request_state.py     RequestState: what the core keeps per request; new_request, its RequestOutput deltas
    eos.py               a request's EOS and stop token ids, as vLLM takes them
    detokenizer.py       tokens -> streamed text, stop strings

Around them (configuration, threads, memory)::

    config.py            EngineConfig, SchedulerConfig, CacheConfig
    threads.py           torch's CPU threads belong to the step thread
    thread_priority.py   per-thread nice values: a long grammar compile yields the CPU to the step thread
    host_memory.py       the serving process's C allocator
"""
