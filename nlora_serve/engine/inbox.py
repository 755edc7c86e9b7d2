"""The step thread's inbox (engine/step_thread.py): one command per caller action, sent from the
front ends' threads and run by the step thread between steps, in arrival order."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from nlora_serve.adapters.runtime.version import AdapterVersion
from nlora_serve.engine.sample.sampling import SamplingParams


@dataclass(slots=True)
class AddRequest:
    engine_id: str
    ids: list[int]  # prompt token ids
    params: SamplingParams
    pinned: AdapterVersion | None  # the adapter version acquired for it (None = base model)
    tenant: str | None
    cache_salt: str | None
    placed: bool  # its adapter has its slot (False: reserved only, it waits for one; engine/slot_wait.py)


@dataclass(slots=True)
class Abort:
    engine_id: str
    reason: str | None  # None: its consumer went away


@dataclass(slots=True)
class AbortAll:
    reason: str


@dataclass(slots=True)
class AbortAdapter:
    name: str  # every request on this adapter (a forced unload)


@dataclass(slots=True)
class SetWeights:
    weights: dict[str, float]  # tenant -> fair-scheduling weight (absent: 1), after a tenants-file reload


@dataclass(slots=True)
class WarmUp:
    names: tuple[str, ...]
    done: threading.Event  # set when ``result`` holds the report or the exception
    result: list
