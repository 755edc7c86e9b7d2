"""Shared fixtures: the default model, prepared once per test session.

The cache root is ``$NLORA_SERVE_CACHE`` or the XDG cache dir (see ``nlora_serve.models.cache``),
so a fresh machine converts the GGUF once and every later run reuses it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
from pathlib import Path

import pytest
import torch

# The suite's one process builds and drops hundreds of engines (and starts servers that inherit
# this): glibc's defaults give the memory back between them; the serving tuning
# (engine/host_memory.py) is tested on its own (tests/engine/test_host_memory.py).
os.environ.setdefault("NLORA_MALLOC_TUNING", "0")

DATA = Path(__file__).parent / "data"
_LIBC = ctypes.CDLL(None)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_FULL_AFTER_GROWTH_BYTES = 1 << 30  # resident growth since the last full collection that calls for one
_last_full = {"resident": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After a module's last test, once its fixtures are torn down and pytest has let go of the
    test's arguments (a fixture's list of stopped servers: ~3 GB of two engines, pinned by a module
    fixture's teardown running before that): collect the reference cycles they sit in, then freeze
    what survived (gc.freeze, as ``serve`` freezes its start-up heap).

    A stopped engine (~1 GB) waits for the cycle collector, which counts objects, not bytes: a
    worker of the two-worker run grew to 14.8 GB and was OOM-killed on a 24 GiB box (round two,
    session 23). So every engine and server teardown collects, and each full collection walked the
    ~0.5M objects of the session's models, tokenizers and imports: 0.24 s alone, ~160 CPU-s of the
    suite's first part (py-spy, session 24). Frozen, they are walked no more. A cycle among frozen
    objects is never freed (an object a global held at a module's end and let go later), so once
    the process has grown by 1 GiB since the last full collection, everything is unfrozen and
    collected, and glibc's free heap given back (malloc_trim); frozen anew after."""
    yield
    if nextitem is not None and nextitem.module is item.module:
        return
    if _resident_bytes() - _last_full["resident"] > _FULL_AFTER_GROWTH_BYTES:
        gc.unfreeze()
        gc.collect()
        if hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        _last_full["resident"] = _resident_bytes()
    else:
        gc.collect()  # what this module made: the rest is frozen
    gc.freeze()


CASES = DATA / "cases"


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The prepared default model directory (config.json, model.safetensors, tokenizer)."""
    from nlora_serve.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def base_fp32(base_model_dir):
    """The default model's :class:`~nlora_serve.models.BaseModel` in float32, whose ``tokenizer()``
    is loaded once: the session's hundreds of engines share it (a load takes 0.09 s, ~130 CPU-s of
    the suite's first part: py-spy, round two session 24). Nothing in nlora_serve writes to a
    tokenizer, and tests that change one change a copy. The front ends' ``tokenizer`` fixtures
    (tests/grpc, tests/http) load their own, as ``serve`` gives its front end its own."""
    import dataclasses

    from nlora_serve.models import BaseModel, load_base

    class SessionBase(BaseModel):
        def tokenizer(self):
            if "_shared_tokenizer" not in self.__dict__:
                self.__dict__["_shared_tokenizer"] = BaseModel.tokenizer(self)
            return self.__dict__["_shared_tokenizer"]

    base = load_base(str(base_model_dir), torch.float32)
    return SessionBase(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


@pytest.fixture(scope="session")
def hf_model(base_model_dir):
    """The transformers reference model in float32 (do not modify; deep-copy to merge weights)."""
    from nlora_serve.models import load_hf_model

    return load_hf_model(base_model_dir, torch.float32)


@pytest.fixture(scope="session")
def base_greedy() -> list[dict]:
    """``BASE_GREEDY.json`` references: prompt_token_ids, greedy_token_ids, top2_logit_margins."""
    return json.loads((CASES / "BASE_GREEDY.json").read_text())["references"]


def load_case(name: str) -> dict:
    """``case.json`` of one adapter case under tests/data/cases."""
    return json.loads((CASES / name / "case.json").read_text())


def greedy_matches(got: list[int], ref: dict) -> bool:
    """Cases README rule: tokens equal up to the first step whose top-2 margin is below 1e-3."""
    for step, (g, r) in enumerate(zip(got, ref["greedy_token_ids"])):
        if g != r:
            return min(ref["top2_logit_margins"][: step + 1]) < 1e-3
    return len(got) >= len(ref["greedy_token_ids"])


@pytest.fixture(scope="session")
def native_ops(tmp_path_factory):
    """The native CPU op, compiled into a fresh folder (this machine has a C compiler: a failure
    to build is a failure, not a skip)."""
    from nlora_serve.kernels.cpu.native import load_native

    ops = load_native(tmp_path_factory.mktemp("kernels"))
    assert ops is not None, "the native CPU op did not build (is `cc` on PATH?)"
    return ops


@pytest.fixture(scope="session")
def bos_tokenizer_dir(base_model_dir, tmp_path_factory) -> Path:
    """A copy of the default model's tokenizer (and chat template) whose post-processor adds its
    BOS (``<|im_start|>``) to a text, as Llama 2/3's and Mistral's do: SmolLM2's adds none, so
    without it no test could tell whether special tokens were added."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tok.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved("Hi").input_ids == [tok.bos_token_id] + saved("Hi", add_special_tokens=False).input_ids
    return out
