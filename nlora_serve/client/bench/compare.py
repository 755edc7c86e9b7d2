"""``nlora-serve bench --compare A.json B.json``: B / A for every throughput and latency figure."""

from __future__ import annotations

import json
from pathlib import Path

from nlora_serve.client.bench.report import LATENCIES, PERCENTILES

THROUGHPUTS = ("request_throughput", "output_throughput", "total_token_throughput", "goodput")
STATS = ("mean", *(f"p{p}" for p in PERCENTILES))


def ratios(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, A, B, B / A) for two summaries; the ratio is None where either side is missing or
    A is 0. Throughput ratios above 1 and latency ratios below 1 mean B is better."""
    rows = [(key, a.get(key), b.get(key)) for key in THROUGHPUTS]
    rows += [(f"{name}_ms.{stat}", a[f"{name}_ms"].get(stat), b[f"{name}_ms"].get(stat))
             for name in LATENCIES for stat in STATS]
    return [(key, x, y, y / x if x and y is not None else None) for key, x, y in rows]


def compare_files(path_a: str | Path, path_b: str | Path) -> str:
    """The ratio table of two bench JSON files, as text.

    Raises:
        OSError, ValueError, KeyError: a file missing, not JSON, or not a bench result.
    """
    a, b = (json.loads(Path(p).read_text())["summary"] for p in (path_a, path_b))
    lines = [f"A = {path_a}", f"B = {path_b}", f"{'metric':<28}{'A':>12}{'B':>12}{'B / A':>10}"]
    for key, x, y, ratio in ratios(a, b):
        cells = ["-" if v is None else f"{v:.2f}" for v in (x, y)] + ["-" if ratio is None else f"{ratio:.3f}"]
        lines.append(f"{key:<28}{cells[0]:>12}{cells[1]:>12}{cells[2]:>10}")
    return "\n".join(lines)
