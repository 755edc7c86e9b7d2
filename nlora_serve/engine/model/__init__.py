"""The model the runner calls: it sees ``(input_ids [T], positions [T])`` and one BatchInfo, nothing
else about the step; nothing here imports the runner or the scheduler.

Modules::

    batch_info.py        BatchInfo: the attention metadata the model reads, built once per step
    llama.py             the Llama-family model: AdaptedLinear, DecoderLayer, LlamaModel
    rope.py              rotary position embeddings, as transformers computes them
    attention/           paged attention per device (cpu.py: torch SDPA or native C; cuda.py: Triton)
    adapter_layer.py     AdapterHook: each step's adapter slots, each projection's kernel calls
    adapter_step.py      the hook's per-step, per-pool and per-projection records
"""
