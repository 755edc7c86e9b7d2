"""Seeded workloads for ``nlora-serve bench``: arrivals, tenant popularity, prompt/output lengths.

Request ``i`` draws everything it needs from its own generator, ``numpy.random.default_rng([seed, i])``,
in a fixed order (arrival gap, base-model coin, tenant, prompt length, output length, prompt tokens,
sampling seed). So the same seed gives the same request list whatever the load shape, and a longer
run's list starts with a shorter one's.

Arrivals follow vLLM ``benchmarks/serve``: gaps are Gamma(shape = burstiness, scale = 1 / (rate ·
burstiness)) seconds, i.e. a Poisson process at burstiness 1, burstier below 1, steadier above;
rate = inf sends every request at t = 0. Tenant popularity is uniform, Zipf(α) over the names in
the order given (rank k has weight (k + 1)^-α, as in S-LoRA's power-law workloads) or round-robin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POPULARITY = ("uniform", "zipf", "round-robin")
# Synthetic prompt token ids are drawn uniformly from this range: clear of the special tokens at
# the bottom of common vocabularies and inside any vocabulary of >= 20k entries.
SYNTHETIC_TOKEN_RANGE = (1000, 20000)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A length in tokens: fixed (``low == high``) or uniform on the integers [low, high]."""

    low: int
    high: int

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise ValueError(f"LengthDist needs 1 <= low <= high; got {self.low}..{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """``"128"`` (fixed) or ``"64:256"`` (uniform, both ends included).

        Raises:
            ValueError: not one or two integers, or out of order.
        """
        low, _, high = text.partition(":")
        return cls(int(low), int(high or low))

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))


@dataclass(frozen=True, slots=True)
class TenantMix:
    """Who each request runs as: one of ``names`` (by ``popularity``), or the base model (None)
    with probability ``base_share``. No names means every request is on the base model."""

    names: tuple[str, ...] = ()
    popularity: str = "uniform"  # one of POPULARITY
    zipf_alpha: float = 1.0  # Zipf exponent α > 0 (popularity "zipf" only)
    base_share: float = 0.0  # probability in [0, 1] that a request uses the base model
    _cdf: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)  # Zipf CDF over ranks

    def __post_init__(self):
        if self.popularity not in POPULARITY:
            raise ValueError(f"TenantMix.popularity must be one of {POPULARITY}; got {self.popularity!r}")
        if not 0.0 <= self.base_share <= 1.0 or not self.zipf_alpha > 0:  # `not x > 0` also refuses NaN
            raise ValueError("TenantMix needs base_share in [0, 1] and zipf_alpha > 0")
        weights = np.arange(1, len(self.names) + 1, dtype=np.float64) ** -self.zipf_alpha
        object.__setattr__(self, "_cdf", np.cumsum(weights) / weights.sum() if self.names else None)

    @staticmethod
    def numbered(prefix: str, count: int) -> tuple[str, ...]:
        """``prefix`` + a zero-padded index (at least 3 digits): tenant-000, tenant-001, ..."""
        width = max(3, len(str(count - 1)))
        return tuple(f"{prefix}{i:0{width}d}" for i in range(count))

    def pick(self, rng: np.random.Generator, index: int) -> str | None:
        """The tenant of request ``index`` (two draws from ``rng`` whatever the popularity)."""
        coin, u = rng.random(), rng.random()
        if not self.names or coin < self.base_share:
            return None
        if self.popularity == "round-robin":
            return self.names[index % len(self.names)]
        if self.popularity == "uniform":
            return self.names[min(int(u * len(self.names)), len(self.names) - 1)]
        return self.names[min(int(np.searchsorted(self._cdf, u, side="right")), len(self.names) - 1)]


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload."""

    index: int
    arrival_s: float  # seconds after the run's start at which an open loop sends it
    tenant: str | None  # adapter / model name; None = the base model
    prompt: tuple[int, ...] | str  # token ids (synthetic or a file's) or text (a prompt file's)
    output_len: int  # max_tokens asked, in tokens
    seed: int  # this request's sampling seed, sent to the server (in [0, 2^63))


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Everything that decides the request list (see the module docstring)."""

    seed: int = 0
    tenants: TenantMix = TenantMix()
    prompt_len: LengthDist = LengthDist(128, 128)  # ignored with a prompt file
    output_len: LengthDist = LengthDist(64, 64)  # a prompt file's "output_len" overrides it
    prompt_file: str | None = None  # JSONL: {"prompt": text} or {"prompt_token_ids": [...]}, opt. "output_len"
    rate: float = math.inf  # mean arrivals per second (open loop); inf = all at t = 0
    burstiness: float = 1.0  # Gamma shape of the gaps; 1 = Poisson

    def __post_init__(self):
        if not (self.rate > 0 and self.burstiness > 0) or math.isinf(self.burstiness):  # NaN fails `> 0`
            raise ValueError(f"WorkloadConfig needs rate > 0 and a finite burstiness > 0; "
                             f"got {self.rate}, {self.burstiness}")


class Workload:
    """The deterministic request list of a :class:`WorkloadConfig`.

    Raises:
        ValueError: an empty or malformed prompt file (the message names the line).
    """

    def __init__(self, config: WorkloadConfig):
        self.config = config
        self.prompts = load_prompt_file(config.prompt_file) if config.prompt_file else None

    def request(self, index: int, arrival_s: float = 0.0) -> tuple[BenchRequest, float]:
        """Request ``index`` sent at ``arrival_s``, and the gap in seconds to the next arrival."""
        c = self.config
        rng = np.random.default_rng([c.seed, index])
        gap = 0.0 if math.isinf(c.rate) else float(rng.gamma(c.burstiness, 1.0 / (c.rate * c.burstiness)))
        tenant = c.tenants.pick(rng, index)
        prompt_len, output_len = c.prompt_len.sample(rng), c.output_len.sample(rng)
        prompt: tuple[int, ...] | str = tuple(int(t) for t in rng.integers(*SYNTHETIC_TOKEN_RANGE, prompt_len))
        if self.prompts is not None:
            prompt, output_len = _from_file(self.prompts[index % len(self.prompts)], output_len)
        seed = int(rng.integers(0, 2**63 - 1))
        return BenchRequest(index, arrival_s, tenant, prompt, output_len, seed), gap

    def requests(self, count: int | None = None, duration_s: float | None = None) -> Iterator[BenchRequest]:
        """Requests in arrival order: ``count`` of them, or those arriving before ``duration_s``
        (the first one that arrives at or after it ends the list); unbounded when both are None."""
        arrival, index = 0.0, 0
        while (count is None or index < count) and (duration_s is None or arrival < duration_s):
            req, gap = self.request(index, arrival)
            yield req
            arrival, index = arrival + gap, index + 1


def _from_file(entry: dict, default_len: int) -> tuple[tuple[int, ...] | str, int]:
    prompt = entry["prompt"] if "prompt" in entry else tuple(entry["prompt_token_ids"])
    return prompt, int(entry.get("output_len", default_len))


def load_prompt_file(path: str | Path) -> list[dict]:
    """Lines of a JSONL prompt file, each {"prompt": str} or {"prompt_token_ids": [int]}, with an
    optional "output_len" (tokens). Blank lines are skipped.

    Raises:
        ValueError: a line that is not such an object, or a file with no prompts.
    """
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or not ({"prompt", "prompt_token_ids"} & entry.keys()):
            raise ValueError(f"{path}:{number}: expected an object with 'prompt' or 'prompt_token_ids'")
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries
