"""A real NloraServer on a loopback port, run on its own event loop in a background thread.

Tests talk to it with the public clients from the test thread, as a remote caller would.
"""

from __future__ import annotations

import asyncio
import threading

from nlora_serve.serving.grpc_server import NloraServer

ADMIN_KEY = "admin-key-for-tests"
TENANT_KEYS = {"tied-co": "key-of-tied-co", "lora-co": "key-of-lora-co", "base-co": "key-of-base-co"}


class RunningServer:
    """Starts ``NloraServer(*args)`` on a private loop; ``target`` is its ``host:port``."""

    def __init__(self, engine, config, auth, info, tokenizer):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self._thread.start()
        self.server = NloraServer(engine, config, auth, info, tokenizer)
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> bool:
        drained = self.call(self.server.shutdown(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        return drained


def matches_reference(got: list[int], want: list[int], margins: list[float]) -> bool:
    """The cases README rule (tests/serving/greedy_rule.py): equal up to the first step whose
    top-2 logit margin in the reference is below 1e-3."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return min(margins[: step + 1]) < 1e-3
    return len(got) >= len(want)
