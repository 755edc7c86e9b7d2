"""Metrics of a benchmark run, as vLLM ``benchmarks/serve`` defines them, and their table / JSON.

Over the successful requests (latencies in milliseconds):
- TTFT: send -> first chunk carrying output.
- TPOT: (E2E - TTFT) / (output_tokens - 1), for requests with more than one output token.
- ITL: every gap between consecutive output chunks, pooled over requests (a chunk may hold several
  tokens, so ITL is per chunk and TPOT per token).
- E2E: send -> end of the stream.
Each as mean, p50, p90, p99 (numpy's default linear percentiles), plus std.
Throughput: completed requests, output tokens and prompt + output tokens per second of the run's
wall time (start to the last request's end). Goodput: requests meeting every given SLO (TTFT,
TPOT, E2E; a one-token request's TPOT counts as 0) per second; failed requests never count.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nlora_serve.client.bench.runner import RunRecord
from nlora_serve.client.bench.targets import RequestResult

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request service-level objectives in milliseconds (None = not checked)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        """Whether a request meets every given objective (a failed one never does)."""
        if not r.ok or r.ttft_s is None:
            return False
        tpot = tpot_s(r) or 0.0
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, tpot), (self.e2el_ms, r.e2e_s))
        return all(limit is None or value * 1000 <= limit for limit, value in checks)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


def tpot_s(r: RequestResult) -> float | None:
    """Time per output token after the first, in seconds (None for fewer than 2 tokens)."""
    if r.output_tokens < 2 or r.ttft_s is None:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def latency_samples(results: list[RequestResult]) -> dict[str, np.ndarray]:
    """Seconds per metric over the successful requests: ttft, tpot, itl (pooled), e2el."""
    ok = [r for r in results if r.ok and r.ttft_s is not None]
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    itls = [g for r in ok for g in np.diff(r.chunk_s)]
    return {"ttft": np.array([r.ttft_s for r in ok]), "tpot": np.array(tpots), "itl": np.array(itls),
            "e2el": np.array([r.e2e_s for r in ok])}


def stats_ms(samples_s: np.ndarray) -> dict[str, float | None]:
    """mean, std and p50/p90/p99 in milliseconds of samples in seconds (None where empty)."""
    keys = ["mean", "std", *(f"p{p}" for p in PERCENTILES)]
    if samples_s.size == 0:
        return dict.fromkeys(keys)
    ms = samples_s * 1000.0
    values = [ms.mean(), ms.std(), *np.percentile(ms, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, values)}


def summarize(run: RunRecord, slo: Slo = Slo()) -> dict:
    """The run's metrics (see the module docstring) as a JSON-ready dict."""
    ok = [r for r in run.results if r.ok]
    prompt, output = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    wall = run.duration_s
    summary = {"requests": len(run.results), "completed": len(ok), "failed": len(run.results) - len(ok),
               "duration_s": wall, "prompt_tokens": prompt, "output_tokens": output,
               "request_throughput": len(ok) / wall, "output_throughput": output / wall,
               "total_token_throughput": (prompt + output) / wall,
               "goodput": sum(slo.met(r) for r in ok) / wall if slo.given else None,
               "errors": dict(Counter(r.error for r in run.results if not r.ok))}
    for name, samples in latency_samples(run.results).items():
        summary[f"{name}_ms"] = stats_ms(samples)
    return summary


def to_json(run: RunRecord, summary: dict, config: dict, path: str | Path) -> None:
    """Write {"config", "summary", "requests"} to ``path`` (per-request timings in seconds)."""
    requests = [{**asdict(r), "chunk_s": [round(t, 6) for t in r.chunk_s]} for r in run.results]
    doc = {"config": config, "summary": summary, "requests": requests}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def table(summary: dict) -> str:
    """A plain-text table of a summary, for stdout."""
    lines = [f"{'requests (completed / failed)':<34} {summary['completed']} / {summary['failed']}",
             f"{'duration (s)':<34} {summary['duration_s']:.2f}",
             f"{'prompt / output tokens':<34} {summary['prompt_tokens']} / {summary['output_tokens']}",
             f"{'request throughput (req/s)':<34} {summary['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<34} {summary['output_throughput']:.2f}",
             f"{'total token throughput (tok/s)':<34} {summary['total_token_throughput']:.2f}",
             f"{'goodput (req/s)':<34} {_fmt(summary['goodput'])}"]
    header = f"{'latency (ms)':<14}" + "".join(f"{k:>10}" for k in ("mean", "p50", "p90", "p99"))
    lines += ["", header, "-" * len(header)]
    for name in LATENCIES:
        row = summary[f"{name}_ms"]
        lines.append(f"{name.upper():<14}" + "".join(f"{_fmt(row[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    if summary["errors"]:
        lines += ["", "errors: " + ", ".join(f"{code} × {n}" for code, n in sorted(summary["errors"].items()))]
    return "\n".join(lines)
