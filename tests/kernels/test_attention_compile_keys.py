"""The paged attention kernels compile once per engine, not once per step's buffer offsets.

Triton's JIT keys a compile on each pointer argument's 16-byte alignment. An eager (prefill or
mixed) step hands the kernels views of its one packed input buffer (engine/runner/step_inputs.py:
``context_lens[:n]``, ``query_starts[n:]``, ``context_lens[n:]``) at offsets that follow the step's
token and sequence counts, and the decode kernel's split workspace (maxima, sums) at offsets that
followed its sequence count: on a GPU each new combination compiled the kernel again, on the step
thread, mid-serving (a second or so each). The interpreter compiles nothing, so this reads the key
Triton's JIT would build (aot._specialise, as the AOT compile check does) for launches that differ
only in those offsets.
"""

from __future__ import annotations

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from nlora_serve.kernels.triton_ops import aot
from nlora_serve.kernels.triton_ops.paged_decode_attention import paged_decode_attention
from nlora_serve.kernels.triton_ops.paged_prefill_attention import paged_prefill_attention
from kernel_cases import TEST_DEVICE  # tests/kernels, on sys.path as pytest puts it

# the kernels decorated for the interpreter (conftest), whose launches are recorded here instead
pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="reads the interpreter's launches")

HEADS, KV_HEADS, DIM = 3, 1, 16  # 3 heads and 2 splits: the sums' offset flips alignment with n


def _compile_keys(monkeypatch, launch) -> dict[str, set[str]]:
    """Per kernel, the distinct JIT keys of the launches ``launch(offset)`` makes at offsets 0 to 3."""
    calls = []
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *args, grid, warmup, **kwargs: calls.append((self, args, kwargs)))
    for offset in range(4):
        launch(offset)
    keys: dict[str, set[str]] = {}
    for fn, args, kwargs in calls:
        key = aot._specialise(aot._Launch(JITFunction(fn.fn, **fn.kwargs), args, kwargs))
        keys.setdefault(fn.__name__, set()).add(repr(key))
    return keys


def test_decode_and_prefill_keys_ignore_the_step_buffers_offsets(monkeypatch):
    kv = torch.zeros(2, 8, 16, KV_HEADS, DIM)
    packed = torch.ones(64, dtype=torch.int64)  # the step's packed int64 rows
    tables = torch.zeros(4, 16, dtype=torch.int32)

    def decode(offset: int) -> None:
        n = 3 + offset % 2  # the workspace's sums move with n
        q, out = torch.zeros(n, HEADS, DIM), torch.zeros(n, HEADS, DIM)
        paged_decode_attention(q, kv, tables[:n], packed[offset:offset + n], 0.25, out, num_splits=2)

    def prefill(offset: int) -> None:
        q, out = torch.zeros(8, HEADS, DIM), torch.zeros(8, HEADS, DIM)
        paged_prefill_attention(q, kv, packed[offset:offset + 3], packed[offset + 5:offset + 7], tables[:2], 4,
                                0.25, out)

    keys = _compile_keys(monkeypatch, decode) | _compile_keys(monkeypatch, prefill)
    assert set(keys) == {"_paged_decode_attention_kernel", "_paged_decode_merge_kernel",
                         "_paged_prefill_attention_kernel"}
    assert {name: len(k) for name, k in keys.items()} == dict.fromkeys(keys, 1)
