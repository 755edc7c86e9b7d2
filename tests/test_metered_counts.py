"""When the token counters count: an engine request's prompt tokens, prefix-cache queries and hits
at its first token (or at its end when it ends before one), once per choice, as vLLM 0.32 counts
``vllm:prompt_tokens`` in the iteration that makes a request's first output, not when it finishes
(a minutes-long generation would otherwise show its prompt on the dashboards only at its end).

``metered`` runs over hand-made deltas here, so every count is known by hand."""

from __future__ import annotations

import asyncio

from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.stream import metered

HTTP = {"frontend": "http"}
COUNTERS = ("nlora_prompt_tokens_total", "nlora_prefix_cache_queries_total", "nlora_prefix_cache_hits_total",
            "nlora_generation_tokens_total")


def _metrics() -> ServerMetrics:
    return ServerMetrics(lambda: {"running": 0, "waiting": 0, "kv_blocks_used": 0, "preemptions": 0},
                         lambda: (0, 0))


def _counts(metrics: ServerMetrics) -> tuple[float, ...]:
    return tuple(metrics.registry.get_sample_value(name, HTTP) for name in COUNTERS)


def _delta(index: int, tokens: list[int], prompt: int, cached: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", "", tokens, finish, prompt, 0, cached_tokens=cached, index=index)


def _after_each(deltas: list[RequestOutput], n: int) -> tuple[list[tuple[float, ...]], ServerMetrics, Admission]:
    """The counters as seen right after each delta reaches the consumer of ``metered``."""
    metrics, admission = _metrics(), Admission(max_queue=8)

    async def stream():
        for out in deltas:
            yield out

    async def consume():
        seen = []
        async for _ in metered(stream(), metrics.request("http"), admission.reserve(), n):
            seen.append(_counts(metrics))
        return seen

    return asyncio.run(consume()), metrics, admission


def test_prompt_tokens_count_at_the_first_token_not_at_the_end():
    deltas = [_delta(0, [], 40, 32),  # a delta with no token yet (e.g. a stop-string hold): nothing
              _delta(0, [7], 40, 32), _delta(0, [8, 9], 40, 32), _delta(0, [10], 40, 32, "length")]
    seen, _, _ = _after_each(deltas, n=1)
    assert seen == [(0, 0, 0, 0), (40, 40, 32, 1), (40, 40, 32, 3), (40, 40, 32, 4)]


def test_each_choice_counts_its_prompt_once_and_one_that_ends_before_a_token_counts_at_its_end():
    deltas = [_delta(0, [1], 40, 0), _delta(1, [2], 40, 32), _delta(0, [3], 40, 0, "stop"),
              _delta(2, [], 40, 32, "abort"), _delta(1, [4], 40, 32, "length")]
    seen, metrics, _ = _after_each(deltas, n=3)
    assert seen == [(40, 40, 0, 1), (80, 80, 32, 2), (80, 80, 32, 3), (120, 120, 64, 3), (120, 120, 64, 4)]
    durations = metrics.registry.get_sample_value("nlora_request_duration_seconds_count", HTTP)
    assert durations == 1  # the request's duration once, at its last choice's end
