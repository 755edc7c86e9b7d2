"""Samples and verdict of a soak run (bench/soak.py): one server's RSS, fds, threads and ``/metrics``
gauges over time, and what must hold once its traffic stops and it idles.

A sample is one JSON line of ``OUT/samples.jsonl``: ``t`` (seconds since the baseline), ``phase``
(``baseline``, ``load``, ``idle``), ``rss_mb``, ``threads``, ``fds``, ``fd_kinds`` (socket,
anon_inode, file, ...), the gauges of :data:`GAUGES` by name, ``adapter_active`` (the sum of
ListAdapters' ``active_requests``), ``store_kb`` and the driver's request ``counts``.

    .venv/bin/python bench/soak_report.py OUT      # the summary and verdict of a finished run
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# the gauges read from /metrics; those of IDLE_ZERO must be 0 once the server idles
GAUGES = ("nlora_requests_running", "nlora_requests_waiting", "nlora_requests_admitted", "nlora_kv_blocks_used",
          "nlora_kv_blocks_total", "nlora_adapters_resident", "nlora_adapter_bytes_resident",
          "nlora_num_preemptions_total")
IDLE_ZERO = ("nlora_requests_running", "nlora_requests_waiting", "nlora_requests_admitted", "nlora_kv_blocks_used",
             "adapter_active")
LOG_PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|Exception")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$")


def parse_metrics(text: str) -> dict[str, float]:
    """The :data:`GAUGES` of a Prometheus text exposition, and ``ended{labels}`` /
    ``rej{labels}`` for each ``nlora_requests_ended_total`` / nonzero ``nlora_requests_rejected_total``
    sample (floats)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name in GAUGES:
            out[name] = value
        elif name == "nlora_requests_ended_total":
            out[f"ended{labels}"] = value
        elif name == "nlora_requests_rejected_total" and value:
            out[f"rej{labels}"] = value
    return out


def proc_sample(pid: int) -> dict:
    """``rss_mb`` (MiB), ``threads``, ``fds`` and ``fd_kinds`` of process ``pid`` (Linux /proc).

    Raises:
        OSError: no such process.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    kinds: dict[str, int] = {}
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        kind = target.split(":")[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"rss_mb": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,
            "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)), "fds": len(fds), "fd_kinds": kinds}


def du_kb(path: Path) -> int:
    """KiB of the regular files under ``path`` (0 when missing)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total // 1024


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t seconds, y)`` points, in y per hour (NaN under two distinct t)."""
    n = len(points)
    if n < 2:
        return float("nan")
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den * 3600 if den else float("nan")


def verdict(samples: list[dict], log_text: str = "", rss_slope_mb_h: float = 20.0, fd_slack: int = 2,
            thread_cap: int = 40, min_half_seconds: float = 300.0) -> list[str]:
    """What a soak run did wrong, one line each (empty: nothing): an :data:`IDLE_ZERO` gauge above 0
    at the last sample, free KV blocks not back to the total, fds above the baseline by more than
    ``fd_slack``, threads above ``thread_cap`` (the pools are bounded: grpc's, asyncio's, the store's),
    the RSS slope over the second half of the load phase above ``rss_slope_mb_h`` MB/h (judged only
    when that half spans ``min_half_seconds``: a shorter one is the start-up's warm-up), and each
    ERROR / Traceback line of ``log_text``.

    Raises:
        ValueError: no baseline, load or idle sample.
    """
    base = next((s for s in samples if s["phase"] == "baseline"), None)
    load = [s for s in samples if s["phase"] == "load" and "rss_mb" in s]
    idle = [s for s in samples if s["phase"] == "idle"]
    if base is None or not load or not idle:
        raise ValueError("a soak's samples need a baseline, load and idle phase")
    last, problems = idle[-1], []
    for key in IDLE_ZERO:
        if last.get(key, 0):
            problems.append(f"{key} is {last[key]} after {last['t'] - load[-1]['t']:.0f} s idle (expected 0)")
    if last.get("nlora_kv_blocks_used", 0) != 0 or last.get("nlora_kv_blocks_total") != base.get("nlora_kv_blocks_total"):
        problems.append(f"KV blocks: {last.get('nlora_kv_blocks_used')} used of {last.get('nlora_kv_blocks_total')} "
                        f"at idle (baseline total {base.get('nlora_kv_blocks_total')})")
    if last.get("fds", 0) > base.get("fds", 0) + fd_slack:
        problems.append(f"fds {base.get('fds')} at baseline, {last.get('fds')} at idle ({last.get('fd_kinds')})")
    if last.get("threads", 0) > thread_cap:
        problems.append(f"threads {last.get('threads')} at idle, over {thread_cap}")
    half = load[len(load) // 2:]
    slope = slope_per_hour([(s["t"], s["rss_mb"]) for s in half])
    if half[-1]["t"] - half[0]["t"] >= min_half_seconds and slope > rss_slope_mb_h:
        problems.append(f"RSS grew {slope:.1f} MB/h over the second half of the load (limit {rss_slope_mb_h})")
    problems += [f"log: {line[:300]}" for line in log_text.splitlines() if LOG_PROBLEM.search(line)]
    return problems


def summary(samples: list[dict]) -> list[str]:
    """The run's numbers, one line each: RSS (baseline, load start/end, idle end, max, slopes),
    then baseline -> idle end (load max) of fds, threads, the store and every gauge."""
    base = next(s for s in samples if s["phase"] == "baseline")
    load = [s for s in samples if s["phase"] == "load" and "rss_mb" in s]
    last = samples[-1]
    half = load[len(load) // 2:]
    lines = [f"RSS MB: baseline {base['rss_mb']:.0f}, load start {load[0]['rss_mb']:.0f}, load end "
             f"{load[-1]['rss_mb']:.0f}, idle end {last['rss_mb']:.0f}, max {max(s['rss_mb'] for s in load):.0f}",
             f"RSS slope: second half of load {slope_per_hour([(s['t'], s['rss_mb']) for s in half]):.1f} MB/h, "
             f"whole load {slope_per_hour([(s['t'], s['rss_mb']) for s in load]):.1f} MB/h "
             f"({load[-1]['t'] - load[0]['t']:.0f} s of load)"]
    for key in ("fds", "threads", "store_kb", "adapter_active", "adapters_listed") + GAUGES:
        lines.append(f"{key}: {base.get(key)} -> {last.get(key)} (load max {max(s.get(key, 0) for s in load)})")
    lines.append(f"fd kinds: {base.get('fd_kinds')} -> {last.get('fd_kinds')}")
    lines.append("ended: " + json.dumps({k: v for k, v in last.items() if k.startswith("ended")}))
    lines.append("rejected: " + json.dumps({k: v for k, v in last.items() if k.startswith("rej")}))
    lines.append("driver counts: " + json.dumps(last.get("counts"), sort_keys=True))
    return lines


def report(out: Path) -> int:
    """Print the summary and verdict of the run in ``out``; 0 when the verdict is empty, else 1."""
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    log_path = out / "server.log"
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    print("\n".join(summary(samples)))
    problems = verdict(samples, log_text)
    print(f"server log: {len(log_text.splitlines())} lines")
    print("verdict: " + ("clean" if not problems else f"{len(problems)} problem(s)"))
    for line in problems[:50]:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(report(Path(sys.argv[1])))
