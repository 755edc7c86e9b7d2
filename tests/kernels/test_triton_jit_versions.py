"""The attention kernels import on every Triton the ``triton`` extra allows (pyproject: >= 3.1).

``triton.jit``'s ``do_not_specialize_on_alignment`` came after 3.1 (vLLM's fused MoE checks for it
for the same reason); the paged attention kernels passed it unconditionally, so on 3.1 (PyTorch
2.5's pin) their modules failed to import and every CUDA step with them. This loads each module
afresh under a ``triton.jit`` without that argument; with it, the kernels still get it.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import triton

from nlora_serve.kernels.triton_ops import paged_decode_attention, paged_prefill_attention

MODULES = (paged_decode_attention, paged_prefill_attention)


def _load_afresh(module):
    spec = importlib.util.spec_from_file_location(f"_fresh_{module.__name__.rsplit('.', 1)[1]}", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_attention_kernels_import_on_a_triton_without_the_alignment_argument(module, monkeypatch):
    real = triton.jit
    assert "do_not_specialize_on_alignment" in inspect.signature(real).parameters  # the pinned one has it
    seen = []

    def jit_3_1(fn=None, *, version=None, repr=None, launch_metadata=None, do_not_specialize=None, debug=None,
                noinline=None):  # triton 3.1's signature
        seen.append(do_not_specialize)
        return real(fn, do_not_specialize=do_not_specialize, debug=debug, noinline=noinline)

    monkeypatch.setattr(triton, "jit", jit_3_1)
    fresh = _load_afresh(module)
    assert seen and callable(fresh.paged_decode_attention if module is paged_decode_attention
                             else fresh.paged_prefill_attention)


def test_the_pinned_triton_still_gets_the_alignment_argument():
    for kernel, names in ((paged_decode_attention._paged_decode_attention_kernel, {"ctx_ptr"}),
                          (paged_decode_attention._paged_decode_merge_kernel, {"ctx_ptr"}),
                          (paged_prefill_attention._paged_prefill_attention_kernel, {"start_ptr", "ctx_ptr"})):
        # a JITFunction (compiled) or the interpreter's wrapper of one (TRITON_INTERPRET=1)
        params = getattr(kernel, "params", None) or getattr(getattr(kernel, "fn", None), "params", None)
        if params is None:
            unaligned = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())
        else:
            unaligned = {p.name for p in params if p.do_not_specialize_on_alignment}
        assert unaligned == names, kernel
