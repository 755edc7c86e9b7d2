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
_FREE_ABOVE_BYTES = 3 << 30  # resident size past which a module's end frees what it dropped


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def _free_memory_after_each_module():
    """After a module's own fixtures (its servers, engines) are torn down: collect the reference
    cycles they sit in, give glibc's free heap back past 3 GB resident (malloc_trim), then freeze
    what survived (gc.freeze, as ``serve`` freezes its start-up heap).

    A stopped engine (~1 GB) waits for the cycle collector, which counts objects, not bytes: a
    worker of the two-worker run grew to 14.8 GB and was OOM-killed on a 24 GiB box (round two,
    session 23). Every engine and server teardown collects for that reason, and each full
    collection walked the ~0.5M objects the session's models, tokenizers and imports hold: 0.24 s
    alone, ~160 CPU-s of the suite's first part (py-spy, session 24). Frozen, they are walked no
    more; only what outlived its module is frozen, and a cycle among those is never freed."""
    yield
    gc.collect()
    if _resident_bytes() > _FREE_ABOVE_BYTES and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
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
