"""The native engine (model runner, paged KV cache, scheduler, sampling, adapter layer) and the
vLLM-backed engine beside it, both behind :class:`nlora_serve.engine.api.Engine`.

Nothing here imports ``nlora_serve.serving`` (the front ends) or their libraries.
"""
