"""Soak: one nlora-serve server (the README's `make serve` tenants, a tenants file, small limits)
under mixed random traffic from a few clients for ``--duration`` seconds, then ``--idle`` seconds
without; samples the process and its gauges every ``--sample`` seconds (soak_report.py) and ends
with a verdict: in-flight gauges back to 0, KV blocks all free (the prefix cache's evictable blocks
count as free), fds and threads back near the baseline, RSS flat over the load's second half, no
ERROR or Traceback in the server log. Exit status 1 on any problem.

Traffic (weighted at random, each client its own seed): chat and completions whole and streamed,
n > 1, logprobs, echo, prompt_logprobs, batches, json_schema / regex / choice outputs, stop strings,
tools (auto, required, named), /v1/responses, gRPC Generate (whole, cancelled after two deltas, past
a short deadline), streams whose socket is closed mid-stream, requests closed before their answer,
bodies cut in half, invalid requests (bad JSON, unknown model, bad fields, bad key, not granted,
over the context, a regex or schema that does not compile), a tenant over its quota; and an admin
thread: hot-swaps of lower's N, uploads and (forced) unloads, /v1/load_lora_adapter and unload,
tenants-file reloads (SIGHUP). Prompts share a ~100-token system prompt 60% of the time.

    .venv/bin/python bench/soak.py --duration 1440 --out /tmp/soak     # ~25 min, ~1.2 GB
    .venv/bin/python bench/soak.py ... --lora-dir LORAS   # also LoRAs lower/numbers/signature
                              # (adapters convert examples/tenants/X --to lora --out LORAS/X) over --max-loras 2
    .venv/bin/python bench/soak_report.py /tmp/soak       # the summary again
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from soak_report import du_kb, parse_metrics, proc_sample, report  # noqa: E402 (bench/ is on sys.path now)

SERVE = "import sys; from nlora_serve.cli import main; sys.argv[0] = 'nlora-serve'; sys.exit(main())"
SHARED = ("You are a careful assistant for the soak test. Answer briefly and plainly, in one or two sentences. "
          "Never use lists. ") * 4  # ~100 tokens: the prefix-sharing system prompt
QUESTIONS = ["How do plants make food?", "What is a forest?", "Name three rivers.", "Why is the sky blue?",
             "What is 12 times 7?", "Describe a cat.", "How does rain form?", "What is a computer?"]
ADAPTERS = ["lower", "signature", "numbers", "tenant-000", "tenant-001", "tenant-002", "BASE"]


class Soak:
    def __init__(self, args):
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.base_name = None
        self.admin_key = "nk-admin-" + secrets.token_hex(16)
        self.user_key = "nk-user-" + secrets.token_hex(16)
        self.tight_key = "nk-tight-" + secrets.token_hex(16)
        self.extra = False
        self.tenants_file = self.out / "tenants.json"
        self.write_tenants()

    # ---- setup ----
    def write_tenants(self):
        h = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
        d = {"admin_keys": [{"name": "ops", "key_sha256": h(self.admin_key)}],
             "tenants": [{"name": "soak", "key_sha256": h(self.user_key), "adapters": ["*"], "base_model": True},
                         {"name": "tight", "key_sha256": h(self.tight_key), "adapters": ["lower"],
                          "base_model": True, "max_concurrent_requests": 1}]}
        if self.extra:
            d["tenants"].append({"name": "extra", "key_sha256": h("nk-extra-" + "0" * 32), "adapters": ["lower"]})
        tmp = self.tenants_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, self.tenants_file)

    def server_cmd(self) -> list[str]:
        """The serve command line (soak_churn.py adds its adapters)."""
        cmd = [str(REPO / ".venv/bin/python"), "-c", SERVE, "serve", "--model", "default",
               "--adapter-dir", str(self.out / "store"),
               "--adapter", f"lower={REPO}/examples/tenants/lower",
               "--adapter", f"signature={REPO}/examples/tenants/signature",
               "--adapter", f"numbers={REPO}/examples/tenants/numbers", "--example-tenants", "3",
               "--port", str(self.a.grpc_port), "--http-port", str(self.a.http_port),
               "--max-model-len", "512", "--kv-cache-memory-bytes", self.a.kv_bytes,
               "--tenants-file", str(self.tenants_file), "--allow-runtime-lora-updating",
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tenant-metrics",
               "--enable-log-requests", "--max-loras", "2", "--drain-seconds", "5"] + self.a.serve_arg
        if self.a.lora_dir:
            for name in ("lower", "numbers", "signature"):
                cmd += ["--adapter", f"lora-{name}={self.a.lora_dir}/{name}"]
                ADAPTERS.append(f"lora-{name}")
        return cmd

    def start_server(self):
        store = self.out / "store"
        if store.exists():
            shutil.rmtree(store)
        cmd = self.server_cmd()
        self.log = open(self.out / "server.log", "wb")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(["nice", "-n", str(getattr(self.a, "nice", 10))] + cmd, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited {self.proc.returncode}; see {self.out}/server.log")
            try:
                st, body = self.http("GET", "/v1/models", None, key=self.user_key, timeout=5)
                if st == 200:
                    self.base_name = json.loads(body)["data"][0]["id"]
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            sys.exit("server not ready in 300 s")
        # the python process under nice
        self.pid = self.proc.pid
        print(f"server pid {self.pid}, base {self.base_name}", flush=True)

    # ---- helpers ----
    def count(self, key):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def http(self, method, path, body, key=None, timeout=120, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.a.http_port, timeout=timeout)
        try:
            h = {"Content-Type": "application/json"}
            if key:
                h["Authorization"] = f"Bearer {key}"
            h.update(headers or {})
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def model(self, rng):
        m = rng.choice(ADAPTERS + ["soak-up", "soak-lora"] if rng.random() < 0.15 else ADAPTERS)
        return self.base_name if m == "BASE" else m

    def messages(self, rng):
        q = rng.choice(QUESTIONS)
        if rng.random() < 0.6:
            return [{"role": "system", "content": SHARED}, {"role": "user", "content": q}]
        return [{"role": "user", "content": q + " " + secrets.token_hex(rng.randint(1, 8))}]

    # ---- traffic ops ----
    def op_chat(self, rng, stream):
        body = {"model": self.model(rng), "messages": self.messages(rng), "max_tokens": rng.randint(4, 24)}
        r = rng.random()
        if r < 0.2:
            body.update(n=rng.randint(2, 3), temperature=0.8, seed=rng.randint(0, 999))
        elif r < 0.35:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3), temperature=0)
        elif r < 0.45:
            body.update(stop=[" the", ".", "\n"], temperature=0.7)
        elif r < 0.52:
            body.update(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                "required": ["a"]}}}, max_tokens=32)
        elif r < 0.58:
            body.update(structured_outputs={"regex": "[a-z]{2,8}( [a-z]{2,8}){0,3}"})
        elif r < 0.62:
            body.update(structured_outputs={"choice": ["yes", "no", "maybe"]})
        elif r < 0.72:
            tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                                      "parameters": {"type": "object", "properties": {
                                                          "city": {"type": "string"}}, "required": ["city"]}}}
            choice = rng.choice(["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
            body.update(tools=[tool], tool_choice=choice, max_tokens=40)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        st, _ = self.http("POST", "/v1/chat/completions", body, key=self.user_key)
        self.count(f"chat{'_stream' if stream else ''}_{st}")

    def op_completion(self, rng):
        body = {"model": self.model(rng), "prompt": rng.choice(QUESTIONS), "max_tokens": rng.randint(2, 16)}
        r = rng.random()
        if r < 0.25:
            body["prompt"] = [rng.choice(QUESTIONS) for _ in range(rng.randint(2, 3))]
        elif r < 0.4:
            body.update(echo=True, logprobs=2, max_tokens=rng.randint(0, 4))
        elif r < 0.5:
            body.update(prompt_logprobs=2)
        if rng.random() < 0.4:
            body.update(stream=True)
        st, _ = self.http("POST", "/v1/completions", body, key=self.user_key)
        self.count(f"completion_{st}")

    def op_responses(self, rng):
        body = {"model": self.model(rng), "input": rng.choice(QUESTIONS), "max_output_tokens": rng.randint(4, 16)}
        if rng.random() < 0.5:
            body["stream"] = True
        st, _ = self.http("POST", "/v1/responses", body, key=self.user_key)
        self.count(f"responses_{st}")

    def raw(self, body: bytes, path="/v1/chat/completions", key=None, extra_len=0):
        s = socket.create_connection(("127.0.0.1", self.a.http_port), timeout=30)
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {key or self.user_key}\r\nContent-Length: {len(body) + extra_len}\r\n\r\n")
        s.sendall(head.encode() + body)
        return s

    def op_disconnect_stream(self, rng):
        body = {"model": self.model(rng), "messages": self.messages(rng), "max_tokens": 64, "stream": True,
                "n": rng.choice([1, 1, 2]), "temperature": 0.9}
        s = self.raw(json.dumps(body).encode())
        try:
            got = b""
            want = rng.randint(1, 3)
            while got.count(b"data:") < want:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        s.close()
        self.count("disconnect_stream")

    def op_abort_whole(self, rng):
        body = {"model": self.model(rng), "messages": self.messages(rng), "max_tokens": 64}
        s = self.raw(json.dumps(body).encode())
        time.sleep(rng.uniform(0, 1.5))
        s.close()
        self.count("abort_whole")

    def op_half_body(self, rng):
        body = json.dumps({"model": self.model(rng), "messages": self.messages(rng)}).encode()
        s = self.raw(body[: len(body) // 2], extra_len=len(body) - len(body) // 2)
        time.sleep(rng.uniform(0, 0.5))
        s.close()
        self.count("half_body")

    def op_invalid(self, rng):
        cases = [
            ("/v1/chat/completions", b"{not json", self.user_key),
            ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, self.user_key),
            ("/v1/chat/completions", {"model": "lower", "messages": [{"role": "user", "content": "x"}],
                                      "temperature": "hot"}, self.user_key),
            ("/v1/chat/completions", {"model": "lower", "messages": [{"role": "user", "content": "x"}], "n": 2,
                                      "temperature": 0}, self.user_key),
            ("/v1/chat/completions", {"model": "lower", "messages": [{"role": "user", "content": "x"}]}, "bad-key"),
            ("/v1/chat/completions", {"model": "signature", "messages": [{"role": "user", "content": "x"}]},
             self.tight_key),
            ("/v1/completions", {"model": "lower", "prompt": "word " * 2000}, self.user_key),
            ("/v1/chat/completions", {"model": "lower", "messages": [{"role": "user", "content": "x"}],
                                      "structured_outputs": {"regex": "("}}, self.user_key),
            ("/v1/chat/completions", {"model": "lower", "messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema", "json_schema": {
                                          "name": "x", "schema": {"type": "frob"}}}}, self.user_key),
            ("/v1/completions", {"model": "lower", "prompt": [[999999999]]}, self.user_key),
        ]
        path, body, key = rng.choice(cases)
        st, _ = self.http("POST", path, body, key=key)
        self.count(f"invalid_{st}")

    def op_tight(self, rng):
        # tenant with max_concurrent_requests 1: two at once -> one 429
        res = []

        def one():
            body = {"model": "lower", "messages": self.messages(rng), "max_tokens": 12}
            res.append(self.http("POST", "/v1/chat/completions", body, key=self.tight_key)[0])
        ts = [threading.Thread(target=one) for _ in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        for st in res:
            self.count(f"tight_{st}")

    def op_grpc(self, rng):
        from nlora_serve.client.sync import NloraClient
        from nlora_serve.client.types import NloraClientError
        m = self.model(rng)
        adapter = None if m == self.base_name else m
        mode = rng.random()
        with NloraClient(f"127.0.0.1:{self.a.grpc_port}", api_key=self.user_key, timeout=120) as c:
            try:
                kw = dict(messages=self.messages(rng), adapter=adapter, max_tokens=rng.randint(4, 32))
                if rng.random() < 0.3:
                    kw.update(temperature=0.8, seed=rng.randint(0, 99))
                if mode < 0.2:  # cancel mid-stream
                    for i, _ in enumerate(c.generate(**kw)):
                        if i >= 1:
                            break
                    self.count("grpc_cancel")
                elif mode < 0.3:
                    list(c.generate(**kw, timeout=rng.uniform(0.05, 0.6)))
                    self.count("grpc_deadline_ok")
                else:
                    c.complete(**kw)
                    self.count("grpc_ok")
            except NloraClientError as e:
                self.count(f"grpc_err_{e.code.name}")

    def worker(self, i):
        rng = random.Random(self.a.seed * 100 + i)
        ops = [(self.op_chat, 5, (False,)), (self.op_chat, 5, (True,)), (self.op_completion, 3, ()),
               (self.op_responses, 1, ()), (self.op_disconnect_stream, 2, ()), (self.op_abort_whole, 1, ()),
               (self.op_half_body, 0.5, ()), (self.op_invalid, 2, ()), (self.op_tight, 0.5, ()),
               (self.op_grpc, 4, ())]
        weights = [w for _, w, _ in ops]
        while not self.stop.is_set():
            fn, _, extra = rng.choices(ops, weights)[0]
            try:
                fn(rng, *extra)
            except Exception as e:  # noqa: BLE001 - the driver keeps going; counted
                self.count(f"driver_exc_{fn.__name__}_{type(e).__name__}")
                time.sleep(0.5)

    # ---- admin ----
    def admin(self):
        from nlora_serve.client.sync import NloraClient
        from nlora_serve.client.types import NloraClientError
        rng = random.Random(self.a.seed + 7)
        swapped = False
        uploaded = False
        lora_loaded = False
        while not self.stop.wait(rng.uniform(4, 10)):
            op = rng.choice(["swap", "swap", "upload", "unload", "lora", "hup"])
            try:
                with NloraClient(f"127.0.0.1:{self.a.grpc_port}", api_key=self.admin_key, timeout=60) as c:
                    if op == "swap":
                        src = "signature" if not swapped else "lower"
                        c.swap_adapter("lower", REPO / f"examples/tenants/{src}/adapter_model.safetensors")
                        swapped = not swapped
                    elif op == "upload":
                        if uploaded:
                            continue
                        src = (Path(self.a.lora_dir) / "numbers" if self.a.lora_dir and rng.random() < 0.5
                               else REPO / "examples/tenants/numbers")
                        c.upload_adapter("soak-up", src)
                        uploaded = True
                    elif op == "unload":
                        if not uploaded:
                            continue
                        c.unload_adapter("soak-up", force=rng.random() < 0.5)
                        uploaded = False
                    elif op == "lora":
                        if not lora_loaded:
                            st, b = self.http("POST", "/v1/load_lora_adapter",
                                              {"lora_name": "soak-lora", "lora_path": str(Path(self.a.lora_dir) / "lower" if self.a.lora_dir and rng.random() < 0.5
                                                                            else REPO / "examples/tenants/lower"),
                                               "load_inplace": True}, key=self.admin_key)
                        else:
                            st, b = self.http("POST", "/v1/unload_lora_adapter", {"lora_name": "soak-lora"},
                                              key=self.admin_key)
                        lora_loaded = not lora_loaded if st == 200 else lora_loaded
                        op = f"lora_{st}"
                        if st != 200:
                            print("lora admin", st, b[:300], flush=True)
                    elif op == "hup":
                        self.extra = not self.extra
                        self.write_tenants()
                        os.kill(self.pid, signal.SIGHUP)
                self.count(f"admin_{op}")
            except NloraClientError as e:
                self.count(f"admin_{op}_err_{e.code.name}")
                print("admin", op, e, flush=True)
            except Exception as e:  # noqa: BLE001
                self.count(f"admin_{op}_exc_{type(e).__name__}")
                print("admin", op, repr(e), flush=True)

    # ---- sampling ----
    def sample(self, phase: str) -> dict:
        s = {"t": round(time.time() - self.t0, 1), "phase": phase}
        try:
            s.update(proc_sample(self.pid))
        except OSError as e:
            s["proc_err"] = str(e)
        try:
            s.update(parse_metrics(self.http("GET", "/metrics", None, timeout=30)[1].decode()))
        except Exception as e:  # noqa: BLE001 - a failed scrape is recorded, the run goes on
            s["metrics_err"] = repr(e)
        try:
            from nlora_serve.client.sync import NloraClient
            with NloraClient(f"127.0.0.1:{self.a.grpc_port}", api_key=self.admin_key, timeout=30) as c:
                ads, _ = c.list_adapters()
                s["adapter_active"] = sum(a.active_requests for a in ads)
                s["adapters_listed"] = len(ads)
        except Exception as e:  # noqa: BLE001
            s["list_err"] = repr(e)
        s["store_kb"] = du_kb(self.out / "store")
        s["counts"] = dict(self.counts)
        with open(self.out / "samples.jsonl", "a") as f:
            f.write(json.dumps(s) + "\n")
        print(json.dumps({k: v for k, v in s.items() if k in (
            "t", "phase", "rss_mb", "threads", "fds", "nlora_requests_running", "nlora_requests_admitted",
            "nlora_kv_blocks_used", "store_kb")}), flush=True)
        return s

    def run(self) -> int:
        self.start_server()
        self.t0 = time.time()
        cache = Path(os.environ.get("NLORA_SERVE_CACHE", Path.home() / ".cache/nlora-serve"))
        cache_start = du_kb(cache)
        self.sample("baseline")
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.a.clients)]
        threads.append(threading.Thread(target=self.admin, daemon=True))
        for t in threads:
            t.start()
        end = time.time() + self.a.duration
        while time.time() < end:
            time.sleep(self.a.sample)
            self.sample("load")
        self.stop.set()
        for t in threads:
            t.join(timeout=180)
        print("traffic stopped; idling", flush=True)
        for _ in range(max(1, int(self.a.idle / self.a.sample))):
            time.sleep(self.a.sample)
            self.sample("idle")
        print(f"cache root KB: {cache_start} at start, {du_kb(cache)} at end", flush=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        print("server exit code", self.proc.returncode, flush=True)
        return report(self.out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=1500)
    p.add_argument("--idle", type=float, default=90)
    p.add_argument("--sample", type=float, default=15)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--grpc-port", type=int, default=50151)
    p.add_argument("--http-port", type=int, default=8100)
    p.add_argument("--kv-bytes", default="48M")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--serve-arg", action="append", default=[])
    p.add_argument("--nice", type=int, default=10, help="the server's niceness")
    p.add_argument("--lora-dir", help="folder of LoRA adapters lower/, numbers/, signature/ (adapters convert "
                   "examples/tenants/X --to lora): served as lora-X beside --max-loras 2, and loaded/uploaded")
    a = p.parse_args()
    sys.exit(Soak(a).run())


if __name__ == "__main__":
    main()
