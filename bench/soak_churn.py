"""Adapter-churn soak: does the server's memory level off while LoRA adapters are loaded, evicted,
read back and unloaded for an hour? bench/soak.py's server (tied example tenants, hot-swaps of
``lower``) with every LoRA folder of ``--lora-dir`` served as ``lora-X`` over ``--max-loras 2``
(requests pick them at random: each miss evicts one and re-reads another from the store, a cold
load) and an admin loop that, every 2-5 s, loads a LoRA under one of 8 rotating names (HTTP
``/v1/load_lora_adapter`` or gRPC UploadAdapter), sends it one request and unloads it (or
hot-swaps ``lower``). Samples RSS and the gauges every ``--sample`` seconds (soak_report.py's
verdict at the end), then prints RSS against the loads and cold loads so far (the server log's
lines).

    for x in lower numbers signature; do
        .venv/bin/nlora-serve adapters convert examples/tenants/$x --to lora --out LORAS/$x; done
    nice -n 19 .venv/bin/python bench/soak_churn.py --lora-dir LORAS --duration 3600 --out /tmp/churn
    .venv/bin/python bench/soak_churn.py --table /tmp/churn      # the table again
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402 (bench/ is on sys.path now)

NAMES = 8  # rotating names of the admin loop's runtime loads


class Churn(soak.Soak):
    """soak.Soak with the churn traffic and admin loop of the module docstring."""

    def __init__(self, args):
        super().__init__(args)
        self.root = Path(args.loras).resolve()
        self.loras = sorted(p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file())
        if len(self.loras) < 3:
            sys.exit(f"--lora-dir {args.loras}: {len(self.loras)} LoRA folders; 3 or more keep 2 slots churning")

    def server_cmd(self) -> list[str]:
        return super().server_cmd() + [a for n in self.loras for a in ("--adapter", f"lora-{n}={self.root / n}")]

    def start_server(self):
        super().start_server()
        (self.out / "t0").write_text(str(time.time()))  # soak.Soak.run's t = 0, for table()

    def worker(self, i):
        rng = random.Random(self.a.seed * 100 + i)
        names = [f"lora-{n}" for n in self.loras] * 3 + ["lower", "signature", "numbers", "tenant-000",
                                                          "tenant-001", "tenant-002", self.base_name]
        while not self.stop.is_set():
            model = rng.choice(names)
            try:
                body = {"model": model, "messages": self.messages(rng), "max_tokens": rng.randint(2, 6),
                        "stream": rng.random() < 0.3}
                st, _ = self.http("POST", "/v1/chat/completions", body, key=self.user_key)
                self.count(f"chat_{'lora' if model.startswith('lora-') else 'other'}_{st}")
            except Exception as e:  # noqa: BLE001 - the driver keeps going; counted
                self.count(f"driver_exc_{type(e).__name__}")
                time.sleep(0.5)

    def admin(self):
        from nlora_serve.client.sync import NloraClient
        rng = random.Random(self.a.seed + 7)
        k = 0
        while not self.stop.wait(rng.uniform(2, 5)):
            name, src = f"churn-{k % NAMES}", self.root / rng.choice(self.loras)
            k += 1
            op = rng.choice(["http", "http", "grpc", "swap"])
            try:
                with NloraClient(f"127.0.0.1:{self.a.grpc_port}", api_key=self.admin_key, timeout=60) as c:
                    if op == "swap":
                        c.swap_adapter("lower", soak.REPO / "examples/tenants" / rng.choice(["signature", "lower"])
                                       / "adapter_model.safetensors")
                        self.count("admin_swap")
                        continue
                    if op == "grpc":
                        c.upload_adapter(name, src)
                    else:
                        st, b = self.http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(src)},
                                          key=self.admin_key)
                        if st != 200:
                            raise RuntimeError(f"load {st}: {b[:300]!r}")
                    self.count(f"admin_load_{op}")
                    st, _ = self.http("POST", "/v1/chat/completions", {
                        "model": name, "messages": self.messages(rng), "max_tokens": 3}, key=self.user_key)
                    self.count(f"chat_churn_{st}")
                    if op == "grpc":
                        c.unload_adapter(name, force=rng.random() < 0.5)
                    else:
                        st, b = self.http("POST", "/v1/unload_lora_adapter", {"lora_name": name}, key=self.admin_key)
                        if st != 200:
                            raise RuntimeError(f"unload {st}: {b[:300]!r}")
                    self.count(f"admin_unload_{op}")
            except Exception as e:  # noqa: BLE001 - counted and printed; the verdict counts the log's errors
                self.count(f"admin_{op}_exc_{type(e).__name__}")
                print("admin", op, name, repr(e)[:300], flush=True)

    def run(self) -> int:
        status = super().run()
        table(self.out)
        return status


def _log_time(line: str) -> float:
    """Epoch seconds of a server log line (``2026-12-07T20:51:09.089Z ...``, UTC)."""
    return calendar.timegm(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S")) + float(line[19:23])


def table(out: Path, every: float = 600) -> None:
    """Print RSS every ``every`` seconds of a finished run in ``out`` against the runtime loads
    (HTTP loads and gRPC uploads) and cold loads (evictions) the server log counts by then."""
    out = Path(out)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    events = []
    for line in open(out / "server.log", errors="replace"):
        kind = ("cold" if "evicted adapter" in line else "load" if "/v1/load_lora_adapter by" in line
                or "UploadAdapter by" in line else "swap" if "SwapAdapter by" in line else None)
        if kind:
            events.append((kind, _log_time(line)))
    start = float((out / "t0").read_text())
    print("| minute | phase | RSS MB | loads + uploads | cold loads | swaps |")
    print("|---|---|---|---|---|---|")
    due = 0.0
    for s in samples:
        if s["t"] >= due or s is samples[-1]:
            n = {k: sum(1 for kind, at in events if kind == k and at <= start + s["t"]) for k in ("load", "cold", "swap")}
            print(f"| {s['t'] / 60:.0f} | {s['phase']} | {s['rss_mb']:,.0f} | {n['load']} | {n['cold']} | {n['swap']} |")
            due += every
    print(f"max RSS {max(s['rss_mb'] for s in samples):,.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--table", metavar="OUT", help="print the table of a finished run and exit")
    p.add_argument("--lora-dir", dest="loras", help="folder of LoRA folders (3 or more), each served as lora-<folder>")
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--idle", type=float, default=120)
    p.add_argument("--sample", type=float, default=30)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--grpc-port", type=int, default=50161)
    p.add_argument("--http-port", type=int, default=8110)
    p.add_argument("--kv-bytes", default="48M")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nice", type=int, default=19, help="the server's niceness")
    p.add_argument("--out")
    p.add_argument("--serve-arg", action="append", default=[])
    a = p.parse_args()
    if a.table:
        table(Path(a.table))
        return
    if not (a.loras and a.out):
        p.error("--lora-dir and --out are required for a run")
    a.lora_dir = None  # soak.Soak's own three LoRAs: this run serves every folder of --lora-dir instead
    sys.exit(Churn(a).run())


if __name__ == "__main__":
    main()
