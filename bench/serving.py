"""The serving scenarios of issue #7, end to end through ``nlora-serve serve`` and the bench client.

    .venv/bin/python bench/serving.py --duration 30                         # every scenario, ours
    .venv/bin/python bench/serving.py --scenarios base lora8 --target openai \\
        --base-url http://127.0.0.1:8000 --base-model MODEL                 # the same load on a peer

Scenarios (closed loop at --concurrency, --prompt-len / --output-len tokens, ignore_eos, greedy):
- base: no adapters.
- tied64: 64 tied IntTune tenants (``serve --example-tenants 64``: tenant-000..063), Zipf(1.0).
- tied1000: 1,000 tied tenants, uniform (ours only: folded to LoRA they would be ~20 GB for a peer).
- lora8: 8 LoRA r=16 tenants on all seven projections (bench/tenants.py; lora-0..7), uniform. Their
  folded plain-LoRA copies, for a peer, are written beside them (``<work>/lora8-lora/t<i>``).
- swapstorm: tied64's load while tenant-000 (the hottest) has its N hot-swapped 10 times a second
  through the admin API; reports swap round-trip p50/p99 and failures (ours only).

With ``--target grpc`` each scenario starts its own server (a subprocess, its adapter store under
--work, kept between runs so tenants are registered once) and stops it with SIGTERM. With
``--target openai`` nothing is started: the peer must already serve the same tenant names (for
vLLM: ``--enable-lora --lora-modules lora-0=<work>/lora8-lora/t0 ...``). Writes
``<out>/<scenario>.json`` and ``.png`` per scenario (``<scenario>-<tag>`` for a peer) and every
scenario's latest summary in ``<out>/serving.json``; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import safetensors.torch
from prometheus_client.parser import text_string_to_metric_families

from nlora_serve.client import AsyncNloraClient, NloraClient, NloraClientError
from nlora_serve.client.bench import (GrpcTarget, LengthDist, LoadShape, TenantMix, Workload, WorkloadConfig,
                                      run_load, summarize, to_json)
from nlora_serve.client.bench.openai_target import OpenAITarget
from nlora_serve.client.bench.plot import plot_run

ROOT = Path(__file__).resolve().parents[1]
# name: (example tied tenants, LoRA tenants, popularity, swaps per second)
SCENARIOS = {"base": (0, 0, "uniform", 0), "tied64": (64, 0, "zipf", 0), "tied1000": (1000, 0, "uniform", 0),
             "lora8": (0, 8, "uniform", 0), "swapstorm": (64, 0, "zipf", 10)}
OURS_ONLY = ("tied1000", "swapstorm")


def tenant_names(scenario: str) -> tuple[str, ...]:
    tied, lora, _, _ = SCENARIOS[scenario]
    return TenantMix.numbered("tenant-", tied) + tuple(f"lora-{i}" for i in range(lora))


def lora_dirs(work: Path, count: int, dtype: str) -> list[Path]:
    """bench/tenants.py's LoRA mix (ours and folded), written once under ``work``."""
    ours = [work / "lora8" / f"t{i}" for i in range(count)]
    if not all((d / "adapter_model.safetensors").is_file() for d in ours):
        sys.path.insert(0, str(ROOT / "bench"))
        from tenants import write_mix  # bench/tenants.py

        from nlora_serve.models import load_base, resolve_dtype, resolve_model

        base = load_base(str(resolve_model("default")), resolve_dtype(dtype))
        ours, _ = write_mix(base, "lora8", work)
    return ours[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(scenario: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str, int, list[str]]:
    """``nlora-serve serve`` for a scenario; returns (process, target, metrics port, command) once
    it answers GetServerInfo.

    Raises:
        RuntimeError: the server exited or did not answer within --start-timeout seconds.
    """
    tied, lora, _, _ = SCENARIOS[scenario]
    port, metrics = free_port(), free_port()
    store = args.work / f"store-{scenario}"
    cmd = [str(Path(sys.executable).parent / "nlora-serve"), "serve", "--port", str(port), "--http-port", "off", "--metrics-port",
           str(metrics), "--adapter-dir", str(store), "--dtype", args.dtype, "--max-queue", "4096",
           "--example-tenants", str(tied), "--max-loras", str(max(lora, 8))]
    for i, folder in enumerate(lora_dirs(args.work, lora, args.dtype) if lora else []):
        cmd += ["--adapter", f"lora-{i}={folder}"]
    log = open(args.out / f"{scenario}.server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    target, deadline = f"127.0.0.1:{port}", time.monotonic() + args.start_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with NloraClient(target, timeout=2) as client:
                client.server_info()
            return proc, target, metrics, cmd
        except NloraClientError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{scenario}: server did not start (see {log.name})")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def swap_payloads(store: Path, name: str, count: int = 20) -> list[bytes]:
    """N-only safetensors files for ``name``: its stored N scaled by 1 + k/1000, k = 1..count."""
    # Read the live server's store directly: an AdapterStore here would clear its staging area
    # (crash leftovers, as it assumes at start) under an upload the server may be writing.
    latest = max((p for p in (store / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    stored = latest / "adapter_model.safetensors"
    n = {k: t for k, t in safetensors.torch.load_file(stored).items() if k.endswith("lora_N.weight")}
    return [safetensors.torch.save({k: (t * (1 + (i + 1) / 1000)).contiguous() for k, t in n.items()})
            for i in range(count)]


async def swap_storm(target: str, name: str, payloads: list[bytes], per_s: float, done: asyncio.Event) -> dict:
    """Swap ``name``'s N ``per_s`` times a second until ``done``; round trips in ms and failures."""
    rtts, failures = [], []
    async with AsyncNloraClient(target, timeout=30) as client:
        k, next_at = 0, time.perf_counter()
        while not done.is_set():
            sent = time.perf_counter()
            try:
                await client.swap_adapter(name, payloads[k % len(payloads)])
                rtts.append((time.perf_counter() - sent) * 1000)
            except NloraClientError as exc:
                failures.append(str(exc))
            k, next_at = k + 1, next_at + 1 / per_s
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    p50, p99 = np.percentile(rtts, [50, 99]) if rtts else (None, None)
    return {"swaps": len(rtts), "failed": len(failures), "rtt_ms_p50": p50, "rtt_ms_p99": p99,
            "failures": failures[:5]}


def server_swap_stats(metrics_port: int) -> dict:
    """The server's own nlora_adapter_swap_seconds: count, mean and the share under 20 ms
    (receipt to the new version admitted, durable write included: DESIGN §9's hot-swap latency)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name.startswith("nlora_adapter_swap_seconds")}
    count = samples[("nlora_adapter_swap_seconds_count", None)]
    return {"server_count": count,
            "server_mean_ms": 1000 * samples[("nlora_adapter_swap_seconds_sum", None)] / count if count else None,
            "server_share_under_20ms":
                samples[("nlora_adapter_swap_seconds_bucket", "0.02")] / count if count else None}


async def drive(scenario: str, target, shape: LoadShape, workload: Workload, storm: tuple | None):
    async with target:
        if storm is None:
            return await run_load(workload, target, shape, progress=True), None
        done = asyncio.Event()
        swaps = asyncio.create_task(swap_storm(*storm, done))
        run = await run_load(workload, target, shape, progress=True)
        done.set()
        return run, await swaps


def run_scenario(scenario: str, args: argparse.Namespace) -> dict:
    """Run one scenario; returns its summary (plus "swaps" for the storm)."""
    _, _, popularity, swaps_per_s = SCENARIOS[scenario]
    workload = Workload(WorkloadConfig(seed=args.seed, tenants=TenantMix(tenant_names(scenario), popularity),
                                       prompt_len=LengthDist(args.prompt_len, args.prompt_len),
                                       output_len=LengthDist(args.output_len, args.output_len)))
    shape = LoadShape("closed", args.concurrency, duration_s=args.duration)
    proc, cmd, storm = None, [], None
    if args.target == "openai":
        target = OpenAITarget(args.base_url, args.api_key, base_model=args.base_model, timeout=600)
    else:
        proc, server, metrics, cmd = start_server(scenario, args)
        target = GrpcTarget(server, timeout=600)
        if swaps_per_s:
            payloads = swap_payloads(args.work / f"store-{scenario}", "tenant-000")
            storm = (server, "tenant-000", payloads, swaps_per_s)
    load_before = os.getloadavg()[0]  # the box is shared: record how busy it was
    try:
        run, swaps = asyncio.run(drive(scenario, target, shape, workload, storm))
        if swaps is not None:
            swaps.update(server_swap_stats(metrics))
    finally:
        if proc is not None:
            stop_server(proc)
    summary = summarize(run)
    summary["load_average_1m"] = [load_before, os.getloadavg()[0]]  # at the load's start and end
    if swaps is not None:
        summary["swaps"] = swaps
    config = {"scenario": scenario, "target": args.target, "server_command": cmd,
              "tenants": len(tenant_names(scenario)),
              "popularity": popularity, "concurrency": args.concurrency, "duration_s": args.duration,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "dtype": args.dtype, "seed": args.seed}
    stem = scenario if args.target == "grpc" else f"{scenario}-{args.tag}"
    to_json(run, summary, config, args.out / f"{stem}.json")
    plot_run(run, args.out / f"{stem}.png", title=f"{stem} ({args.target})")
    return summary


def print_table(results: dict[str, dict]) -> None:
    """One row per scenario; "vs base" is output tok/s over the base scenario's."""
    base = results.get("base", {}).get("output_throughput")
    print(f"\n{'scenario':<16}{'done':>6}{'fail':>6}{'req/s':>8}{'tok/s':>8}{'vs base':>9}"
          f"{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>8}{'load avg':>12}  (ms)")
    for name, s in results.items():
        ratio = f"{s['output_throughput'] / base:.2f}" if base else "-"
        t, p = s["ttft_ms"], s["tpot_ms"]
        print(f"{name:<16}{s['completed']:>6}{s['failed']:>6}{s['request_throughput']:>8.2f}"
              f"{s['output_throughput']:>8.1f}{ratio:>9}{t['p50'] or 0:>10.0f}{t['p99'] or 0:>8.0f}"
              f"{p['p50'] or 0:>10.0f}{p['p99'] or 0:>8.0f}"
              f"{'{:.1f}-{:.1f}'.format(*s.get('load_average_1m', (0, 0))):>12}")
        if "swaps" in s:
            w = s["swaps"]
            print(f"{'':<16}{w['swaps']} swaps, {w['failed']} failed, round trip p50 {w['rtt_ms_p50'] or 0:.1f} ms, "
                  f"p99 {w['rtt_ms_p99'] or 0:.1f} ms; server mean {w['server_mean_ms'] or 0:.1f} ms, "
                  f"{100 * (w['server_share_under_20ms'] or 0):.0f}% under 20 ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), help="which to run")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per scenario (default: 30)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight (default: 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                   help="our server's dtype (default: float32)")
    p.add_argument("--target", choices=["grpc", "openai"], default="grpc",
                   help="grpc: start our server per scenario; openai: an already running peer at --base-url")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the OpenAI-compatible peer")
    p.add_argument("--base-model", default=None,
                   help="the peer's model name for base requests (default: from its GET /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key for the peer (default: none)")
    p.add_argument("--tag", default="openai", help="openai target: results go to <scenario>-<tag>.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/nlora-bench-serving"),
                   help="adapter stores and tenant folders, kept between runs (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serving",
                   help="result folder (default: bench/out/serving in this checkout)")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds a server may take to start (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    index = args.out / "serving.json"  # every scenario's latest summary, across invocations
    results = json.loads(index.read_text()) if index.is_file() else {}
    for scenario in args.scenarios:
        if args.target == "openai" and scenario in OURS_ONLY:
            print(f"{scenario}: ours only (needs tied tenants / the admin swap API), skipped")
            continue
        key = scenario if args.target == "grpc" else f"{scenario}-{args.tag}"
        results[key] = run_scenario(scenario, args)
        index.write_text(json.dumps(results, indent=1, default=float))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
