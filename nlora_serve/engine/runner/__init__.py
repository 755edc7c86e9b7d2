"""The model runner and its device plumbing (vLLM v1's worker): a scheduled step's inputs onto the
device in one copy, its forward eager or replayed as a CUDA graph, and what start-up sizes and
compiles before the first request.

Modules::

    model_runner.py      ModelRunner: one step's forward, eager or replayed as a CUDA graph
    step_inputs.py       a step's ids, positions and metadata in one host-to-device copy
    block_tables.py      every sequence's block table in one persistent host tensor
    device_values.py     small host lists onto the device without a stream sync
    kv_cache.py          the paged KV cache tensor
    cuda_graphs.py       decode steps as CUDA graphs
    keyed_graphs.py      graphs by (size, adapter pools), at most 8 pool combinations kept
    piecewise_graphs.py  prefill and mixed steps as piecewise CUDA graphs
    graph_safety.py      a CPU check that a step can be captured

At start-up::

    runner_setup.py      the model runner at start-up: kernels, attention, KV cache size, CUDA graphs
    memory.py            how many KV blocks the engine gets
    warmup.py            compile and capture before the first request
    dummy_sampler.py     the sampler's worst case, for memory.py and warmup.py
"""
