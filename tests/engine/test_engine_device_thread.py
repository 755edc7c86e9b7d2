"""The engine's constructor and step thread run with the engine's GPU as their current device
(engine/threads.py ``on_device``): Triton launches, ``torch.cuda.current_stream()`` / ``Stream()``
and ``Event.record()`` follow the thread's current device, not the tensors', so with
``--device cuda:1`` they went to GPU 0. No GPU here: the context is recorded per thread instead."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

from nlora_serve.engine import core as core_mod, step_thread as step_thread_mod
from nlora_serve.engine.threads import on_device


def test_constructor_and_step_thread_enter_the_engine_device(make_engine, monkeypatch):
    entered = []

    def record(device):
        entered.append((threading.current_thread().name, torch.device(device).type))
        return nullcontext()

    monkeypatch.setattr(core_mod, "on_device", record)
    monkeypatch.setattr(step_thread_mod, "on_device", record)
    make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64).shutdown()  # joins the step thread
    assert (threading.current_thread().name, "cpu") in entered and ("nlora-engine", "cpu") in entered


def test_on_device_picks_the_index_on_cuda_and_nothing_on_the_cpu():
    ctx = on_device(torch.device("cuda:1"))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(on_device(torch.device("cpu")), nullcontext)
