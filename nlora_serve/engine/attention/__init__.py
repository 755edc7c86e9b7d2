"""Paged attention over the KV cache, one module per device."""

from nlora_serve.engine.attention.cpu import paged_attention, write_kv

__all__ = ["paged_attention", "write_kv"]
