"""The two pinned staging buffers of async scheduling (engine/runner/step_inputs.py) are never rewritten
while a step that copied out of one may still be queued.

On CUDA, step n's inputs go to the device with ``copy_(non_blocking=True)`` from pinned buffer
n mod 2; the host may overwrite that buffer only after step n's copy has run, which it knows once
step n's tokens were read back (``SampledStep.read`` waits on an event recorded after step n).
The CPU has no staging copy, so this replays the schedule: every ``StepInputs.build`` takes the
next buffer in turn and holds it until its step is read; a build into a held buffer is the race.
"""

from __future__ import annotations

import torch

from nlora_serve.engine import core as core_mod
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.runner.step_inputs import StepInputs
from nlora_serve.engine.sample.step_output import SampledStep


class StagingLedger:
    """Which step holds each staging buffer; ``races`` lists builds into a held one."""

    def __init__(self, buffers: int = 2) -> None:
        self.holder: list[int | None] = [None] * buffers
        self.turn, self.builds, self.races = 0, 0, []
        self.step_of: dict[int, int] = {}  # id(SampledStep) -> its build
        self.keep: list = []  # the steps, so their ids stay unique

    def build(self) -> None:
        self.turn = (self.turn + 1) % len(self.holder)
        if self.holder[self.turn] is not None:
            self.races.append((self.builds, self.holder[self.turn]))
        self.holder[self.turn] = self.builds
        self.builds += 1

    def launched(self, step: SampledStep) -> None:
        self.step_of[id(step)] = self.builds - 1
        self.keep.append(step)

    def read(self, step: SampledStep) -> None:
        n = self.step_of.get(id(step))
        self.holder = [None if h == n else h for h in self.holder]


def run_async(base, monkeypatch, ledger: StagingLedger, fail_build: int | None = None) -> None:
    """Serve a few requests with async scheduling; ``fail_build``: that build's step fails after it
    took its buffer (its forward raised), and the engine fails every request as LLMEngine does."""
    real_build, real_sample, real_read = StepInputs.build, core_mod.sample_step, SampledStep.read
    real_wait = getattr(EngineCore, "_wait_device", None)

    def build(self, *args, **kwargs):
        ledger.build()
        if ledger.builds - 1 == fail_build:
            raise RuntimeError("the step's forward failed")
        return real_build(self, *args, **kwargs)

    def wait_device(self):  # the device idle: no copy out of any staging buffer is still queued
        real_wait(self)
        ledger.holder = [None] * len(ledger.holder)

    def sample_step(*args, **kwargs):
        step = real_sample(*args, **kwargs)
        ledger.launched(step)
        return step

    def read(self):
        out = real_read(self)  # the event wait: from here the step's input copy has run
        ledger.read(self)
        return out

    monkeypatch.setattr(StepInputs, "build", build)
    monkeypatch.setattr(core_mod, "sample_step", sample_step)
    monkeypatch.setattr(SampledStep, "read", read)
    monkeypatch.setattr(EngineCore, "_wait_device", wait_device, raising=False)
    core = EngineCore(EngineConfig(async_scheduling=True,
                                   scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                                             max_model_len=128),
                                   cache=CacheConfig(block_size=16, num_blocks=32)), base)
    gen = torch.Generator().manual_seed(0)
    jobs = [(3, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)),
            (40, SamplingParams(max_tokens=3, temperature=0.8, seed=1, ignore_eos=True)),  # chunked prefill
            (5, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)),
            (6, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))]  # aborted mid-flight
    for i, (n, params) in enumerate(jobs):
        core.add(f"r{i}", torch.randint(3, 1000, (n,), generator=gen).tolist(), params)
    steps = 0
    while core.has_work():
        try:
            core.step()
        except RuntimeError:
            core.fail_all("failed")
            for i, (n, params) in enumerate(jobs):  # served on: new requests after the failure
                core.add(f"again{i}", torch.randint(3, 1000, (n,), generator=gen).tolist(), params)
        steps += 1
        if steps == 3:
            core.abort("r3")
    assert steps >= 6 and ledger.builds >= 6


def test_no_step_builds_into_a_staging_buffer_still_in_flight(base_fp32, monkeypatch):
    ledger = StagingLedger()
    run_async(base_fp32, monkeypatch, ledger)
    assert ledger.races == [], f"(build, step still holding its buffer): {ledger.races}"


def test_a_failed_step_leaves_no_buffer_in_flight_for_the_steps_after(base_fp32, monkeypatch):
    # the failed launch took one buffer and the step before it the other, neither ever read back:
    # fail_all waits for the device (EngineCore._wait_device) before the engine serves on
    ledger = StagingLedger()
    run_async(base_fp32, monkeypatch, ledger, fail_build=3)
    assert ledger.races == [], f"(build, step still holding its buffer): {ledger.races}"


def test_the_ledger_sees_a_race_with_one_buffer(base_fp32, monkeypatch):
    # the check itself: one buffer for every step is rewritten while the step before is in flight
    ledger = StagingLedger(buffers=1)
    run_async(base_fp32, monkeypatch, ledger)
    assert ledger.races
