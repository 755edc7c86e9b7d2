"""Hot-swap latency under load (DESIGN §9: receipt -> new version admitted, durable write included).

    .venv/bin/python bench/swap.py                                   # this checkout
    .venv/bin/python bench/swap.py --src before=/tmp/old after=.     # two source trees, interleaved

For each source tree (``label=path``: a folder holding the ``nlora_serve`` package, imported ahead
of the installed one) and each of --rounds rounds, starts ``nlora-serve serve --example-tenants 64``
in a subprocess (its store under --work, kept between runs), then:
- quiet: --swaps hot-swaps of tenant-000's N, one at a time, no other traffic;
- load: the same number of swaps at --rate per second while --streams closed-loop streams generate
  on the 64 tenants (Zipf-ish: half of them on tenant-000, the one being swapped).
Server-side latencies are the server's own ``AdminServicer.swap_seconds`` (dumped at exit); client
round trips are measured here. Prints a table (ms) with the 1-minute load average and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch

from nlora_serve.client import AsyncNloraClient, NloraClient, NloraClientError

ROOT = Path(__file__).resolve().parents[1]
TENANT = "tenant-000"
# Run inside the server process: keep the admin servicer's per-swap latencies and dump them at exit.
SERVER_WRAPPER = """
import atexit, json, sys
import nlora_serve
from nlora_serve.serving.grpc_api import admin as grpc_admin
print("nlora_serve from", nlora_serve.__file__, file=sys.stderr, flush=True)
_init = grpc_admin.AdminServicer.__init__
def _keep(self, *a, **k):
    _init(self, *a, **k)
    atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(list(self.swap_seconds))))
grpc_admin.AdminServicer.__init__ = _keep
from nlora_serve.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(src: Path, store: Path, dump: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    cmd = [sys.executable, "-c", SERVER_WRAPPER, str(dump), "serve", "--port", str(port), "--http-port", "0", "--adapter-dir",
           str(store), "--example-tenants", "64", "--dtype", "float32"]
    # cwd = the tree too: ``python -c`` puts the working directory ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, env=env, cwd=src.resolve(), stdout=subprocess.DEVNULL, stderr=open(f"{dump}.log", "w"))
    target, deadline = f"127.0.0.1:{port}", time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with NloraClient(target, timeout=2) as client:
                client.server_info()
            return proc, target
        except NloraClientError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server from {src} did not start (see {dump}.log)")


async def run_phase(target: str, files: list[bytes], rate: float | None, streams: int) -> dict:
    """Swap through ``files`` (at ``rate``/s, or back to back); ``streams`` generate meanwhile."""
    rtts, failed, done = [], [], asyncio.Event()
    rng = random.Random(0)

    async def stream(client):
        while not done.is_set():
            tenant = TENANT if rng.random() < 0.5 else f"tenant-{rng.randrange(64):03d}"
            try:
                async for _ in client.generate(list(range(100, 132)), adapter=tenant, max_tokens=16,
                                               ignore_eos=True):
                    pass
            except NloraClientError as exc:
                failed.append(str(exc))

    async def swapper(client):
        await asyncio.sleep(0.5 if streams else 0)  # let the streams fill the batch
        next_at = time.perf_counter()
        for data in files:
            sent = time.perf_counter()
            try:
                await client.swap_adapter(TENANT, data)
                rtts.append(time.perf_counter() - sent)
            except NloraClientError as exc:
                failed.append(str(exc))
            next_at += 1 / rate if rate else 0
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        done.set()

    async with AsyncNloraClient(target, timeout=120) as client:
        await asyncio.gather(swapper(client), *(stream(client) for _ in range(streams)))
    return {"rtt": rtts, "failed": failed}


def stored_n(store: Path) -> dict:
    folder = max((store / TENANT).iterdir(), key=lambda p: p.name if p.name.isdigit() else "")
    return safetensors.torch.load_file(folder / "adapter_model.safetensors")


def one_run(label: str, src: Path, args: argparse.Namespace, round_: int) -> list[dict]:
    store, dump = args.work / f"store-{label}", args.work / f"{label}-{round_}.json"
    proc, target = start_server(src, store, dump)
    try:
        n = stored_n(store)
        files = [safetensors.torch.save({k: (t * (1 + (i + 1) / 1e4)).contiguous() for k, t in n.items()})
                 for i in range(2 * args.swaps)]
        phases = []
        for name, chunk, rate, streams in (("quiet", files[:args.swaps], None, 0),
                                           ("load", files[args.swaps:], args.rate, args.streams)):
            load = os.getloadavg()[0]
            phases.append({"label": label, "round": round_, "phase": name, "load_avg_1m": load,
                           **asyncio.run(run_phase(target, chunk, rate, streams))})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    server = json.loads(dump.read_text())
    for phase, count in zip(phases, (args.swaps, args.swaps)):
        phase["server"], server = server[:count], server[count:]
    return phases


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", nargs="+", default=[f"this={ROOT}"], help="label=path of a source tree")
    p.add_argument("--rounds", type=int, default=2, help="runs per tree, interleaved (default: 2)")
    p.add_argument("--swaps", type=int, default=100, help="swaps per phase (default: 100)")
    p.add_argument("--rate", type=float, default=10.0, help="swaps per second under load (default: 10)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams under load (default: 8)")
    p.add_argument("--work", type=Path, default=Path("/tmp/nlora-bench-swap"), help="stores and dumps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "swap.json", help="JSON results")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    trees = [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.src]
    rows = [row for r in range(args.rounds) for label, src in trees for row in one_run(label, src, args, r)]
    print(f"\n{'tree':<10}{'round':>6}{'phase':>7}{'load':>6}{'failed':>8}"
          f"{'server p50':>12}{'p99':>7}{'max':>7}{'client p50':>12}{'p99':>7}  (ms)")
    for r in rows:
        s, c = r["server"], r["rtt"]
        print(f"{r['label']:<10}{r['round']:>6}{r['phase']:>7}{r['load_avg_1m']:>6.2f}{len(r['failed']):>8}"
              f"{ms(s, 50):>12.1f}{ms(s, 99):>7.1f}{ms(s, 100):>7.1f}{ms(c, 50):>12.1f}{ms(c, 99):>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
