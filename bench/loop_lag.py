"""How long one request or admin action holds the server's event loop (every other tenant's
stream waits that long for its next token): a probe task on the loop sleeps 1 ms in a loop and
records by how much each sleep overshot, while the action runs at its allowed maximum size.

A real NloraServer (both front ends, auth on, the default model in float32, an adapter store) on a
private event loop in a thread, as tests/grpc/grpc_harness.py runs one; the actions come from this
thread over HTTP and gRPC, as a client's would. Each action runs ``--reps`` times; the line gives
the largest overshot of each run (ms) and the action's answer. ``idle`` is the box's own noise:
on a loaded 2-core machine it reaches tens of ms, so compare runs side by side, several times. The
clients run in this process (their own copies and hashing share the server's GIL), so a few ms of
each number are theirs.

    .venv/bin/python bench/loop_lag.py [--reps 3] [--only NAME ...]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/loop_lag.py   # another version's code
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx2
import torch

from nlora_serve.client import NloraClient
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.models import BaseModel, load_base, resolve_model
from nlora_serve.serving.auth import Authenticator, hash_key
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.http_api.server import MAX_BODY_BYTES
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.server_config import ServerConfig

ROOT = Path(__file__).parents[1]
ADMIN_KEY, TENANT_KEY = "bench-admin-key", "bench-tenant-key"


def _tenants(path: Path, extra: int = 0) -> None:
    """A tenants file: the admin, the bench tenant, and ``extra`` more tenants."""
    tenants = [{"name": "bench", "key_sha256": hash_key(TENANT_KEY), "base_model": True}]
    tenants += [{"name": f"t{i}", "key_sha256": hash_key(f"k{i}"), "adapters": ["lora-*"], "base_model": True}
                for i in range(extra)]
    path.write_text(json.dumps({"admin_keys": [{"name": "ops", "key_sha256": hash_key(ADMIN_KEY)}],
                                "tenants": tenants}))


class Server:
    """NloraServer on its own loop in a thread, with the lag probe on that loop."""

    def __init__(self, root: Path):
        base = load_base(str(resolve_model("default")), torch.float32)
        self.tenants = root / "tenants.json"
        _tenants(self.tenants)
        engine_config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256,
                                                               max_model_len=1024),
                                     cache=CacheConfig(num_blocks=256), adapter_dir=str(root / "store"))
        self.engine = LLMEngine(engine_config, base)
        config = ServerConfig(port=0, http_port=0, tenants_file=str(self.tenants), allow_runtime_lora_updating=True)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = NloraServer(self.engine, config, Authenticator.from_file(self.tenants),
                                  server_info(base, engine_config, config), BaseModel.tokenizer(base))
        self.call(self.server.start())
        self.http = f"http://127.0.0.1:{self.server.http_port}"
        self.target = f"127.0.0.1:{self.server.port}"
        gc.collect()
        gc.freeze()  # as serve's freeze_startup_heap

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def lag_ms(self, action) -> tuple[float, object]:
        """(largest overshoot of a 1 ms sleep on the loop while ``action()`` ran, ms; its result)."""
        lags, running = [], [True]

        async def probe():
            while running[0]:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - start - 0.001)

        task = asyncio.run_coroutine_threadsafe(probe(), self.loop)
        time.sleep(0.05)
        try:
            result = action()
        except Exception as exc:  # a refusal is an answer too
            result = f"{type(exc).__name__}: {exc}"
        time.sleep(0.02)
        running[0] = False
        task.result(10)
        return 1e3 * max(lags), result

    def reload(self) -> bool:
        """The SIGHUP handler as serve installs it (this checkout's or an older one's, on the loop)."""
        async def on_loop():
            soon = getattr(self.server, "reload_tenants_soon", None)
            return soon() if soon is not None else self.server.reload_tenants()
        done = self.call(on_loop())
        return done if isinstance(done, bool) else done.result(600)

    def stop(self):
        self.call(self.server.shutdown(0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.engine.shutdown()


def _nested(depth: int) -> list:
    """``[[...[1]...]]``, ``depth`` arrays deep (made without recursion)."""
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def actions(server: Server, root: Path) -> dict:
    """name -> action (each at the server's cap: a 16 MiB body, --max-adapter-bytes, ...)."""
    http = httpx2.Client(timeout=600)
    tenant = {"Authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    model = http.get(server.http + "/v1/models", headers=tenant).json()["data"][0]["id"]
    words = "hi " * ((MAX_BODY_BYTES - 300) // 3)

    def post(path: str, body: dict):
        content = json.dumps(body).encode()  # made before: json.dumps here held the server's GIL ~0.2-0.6 s
        return lambda: (lambda r: f"{r.status_code} {r.text[:70]}")(
            http.post(server.http + path, content=content, headers=tenant))

    garbage = root / "garbage"  # refused by the loader, in the worker thread: the loop's part is all there is
    garbage.mkdir()
    shutil.copy(ROOT / "tests/data/cases/lora-rslora/adapter_config.json", garbage)
    with open(garbage / "adapter_model.safetensors", "wb") as file:
        file.write(os.urandom(server.server.config.max_adapter_bytes - 4096))
    grpc = NloraClient(server.target, api_key=ADMIN_KEY, timeout=600)
    swap = os.urandom(server.server.limits.receive_bytes - 4096)  # made before: this process's GIL is the server's
    server.engine.adapters.register_dir("inttune-nystrom-tied", ROOT / "tests/data/cases/inttune-nystrom-tied")

    def tenants(count: int):
        def reload():
            _tenants(server.tenants, count)
            return server.reload()
        return reload

    return {
        "idle": lambda: time.sleep(0.5),
        "chat: 16 MiB message": post("/v1/chat/completions", {"model": model, "max_tokens": 1,
                                                               "messages": [{"role": "user", "content": words}]}),
        "chat: 300,000 messages (10 MB)": post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "a"}] * 300_000}),
        "completion: 2,500,000 prompts (15 MB)": post("/v1/completions", {"model": model, "max_tokens": 1,
                                                                          "prompt": ["ab"] * 2_500_000}),
        "completion: 1024 prompts x 1000 ids (5 MB)": post("/v1/completions", {
            "model": model, "max_tokens": 1, "prompt": [list(range(1, 1001))] * 1024}),
        "completion: one prompt of 2,600,000 ids, truncated (served)": post("/v1/completions", {
            "model": model, "max_tokens": 1, "prompt": [100] * 2_600_000, "truncate_prompt_tokens": 512}),
        "chat: 1,000 messages of a bad content (35 KB)": post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": 5}] * 1000}),
        "completion: stop of 2,500,000 strings (15 MB)": post("/v1/completions", {
            "model": model, "max_tokens": 1, "prompt": "hi", "stop": ["ab"] * 2_500_000}),
        "chat: logit_bias of 1,000,000 entries (14 MB)": post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "a"}],
            "logit_bias": {str(i): 1.0 for i in range(1_000_000)}}),
        "chat: 290,000 messages, a field nested 900 deep (10 MB)": post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "a"}] * 290_000,
            "deep": _nested(900)}),
        "completion: 3,000,000 one-id prompts (15 MB)": post("/v1/completions", {
            "model": model, "max_tokens": 1, "prompt": [[1]] * 3_000_000}),
        "responses: 100,000 function_call items (8 MB)": post("/v1/responses", {
            "model": model, "max_output_tokens": 1, "input": [{"role": "user", "content": "a"}] + [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}] * 100_000}),
        "chat: 100,000 tools (5 MB)": post("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "a"}],
            "tools": [{"type": "function", "function": {"name": "f"}}] * 100_000}),
        "responses: 100,000 tools (4 MB)": post("/v1/responses", {
            "model": model, "max_output_tokens": 1, "input": "a",
            "tools": [{"type": "function", "name": "f"}] * 100_000}),
        "tokenize: 16 MiB text": post("/tokenize", {"model": model, "prompt": words}),
        "detokenize: 2,600,000 ids (16 MiB)": post("/detokenize", {"model": model, "tokens": [100] * 2_600_000}),
        "gRPC UploadAdapter: 256 MiB (refused)": lambda: grpc.upload_adapter("garbage", garbage),
        "gRPC SwapAdapter: largest payload (refused)": lambda: grpc.swap_adapter(
            "inttune-nystrom-tied", swap),
        "HTTP load_lora_adapter: 256 MiB folder (refused)": lambda: http.post(
            server.http + "/v1/load_lora_adapter", json={"lora_name": "garbage", "lora_path": str(garbage)},
            headers=admin).status_code,
        "SIGHUP reload: 10,000 tenants (1.4 MB)": tenants(10_000),
        "SIGHUP reload: 50,000 tenants (7 MB)": tenants(50_000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="names (or the start of names) of the actions to run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loop-lag-"))
    server = Server(root)
    try:
        for name, action in actions(server, root).items():
            if args.only and name != "idle" and not any(name.startswith(o) for o in args.only):
                continue
            runs = [server.lag_ms(action) for _ in range(args.reps)]
            print(f"{name:50s} max loop lag {max(r[0] for r in runs):7.1f} ms  (runs: "
                  f"{', '.join(f'{r[0]:.0f}' for r in runs)})  -> {str(runs[-1][1])[:60]!r}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
