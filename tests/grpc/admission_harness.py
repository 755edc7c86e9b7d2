"""What the admission-before-tokenizing tests of both front ends share: three tenants on the base
model (one with a quota), a tokenizer whose one thread a test can hold, and the admission counts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from nlora_serve.serving.auth import hash_key

CAPPED_KEY, FREE_KEY, OTHER_KEY = "key-of-capped-co", "key-of-free-co", "key-of-other-co"
MAX_QUEUE, QUOTA = 4, 2
HOLD = "hold the tokenizer thread"


def write_quota_tenants(path: Path) -> Path:
    """capped-co (max_concurrent_requests QUOTA), free-co and other-co (no quota), all on the base
    model only."""
    tenants = [{"name": "capped-co", "key_sha256": hash_key(CAPPED_KEY), "adapters": [], "base_model": True,
                "max_concurrent_requests": QUOTA},
               {"name": "free-co", "key_sha256": hash_key(FREE_KEY), "adapters": [], "base_model": True},
               {"name": "other-co", "key_sha256": hash_key(OTHER_KEY), "adapters": [], "base_model": True}]
    path.write_text(json.dumps({"tenants": tenants}))
    return path


class HeldTokenizer:
    """Records every text the engine's tokenizer encodes; the text HOLD blocks the front ends' one
    tokenizer thread until ``release`` is set."""

    def __init__(self, tokenizer, monkeypatch):
        self.seen: list[str] = []
        self.busy, self.release = threading.Event(), threading.Event()
        original = tokenizer.encode

        def encode(text, *args, **kwargs):
            self.seen.append(text)
            if text == HOLD:
                self.busy.set()
                self.release.wait(60)
            return original(text, *args, **kwargs)

        monkeypatch.setattr(tokenizer, "encode", encode)


def wait_for(condition, within: float = 10.0) -> bool:
    """Poll ``condition`` every 10 ms for up to ``within`` seconds; whether it came true."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def admission_counts(server) -> tuple[int, dict]:
    """(requests counted in all, per tenant) by the running server's Admission."""
    admission = server.server.admission
    return admission.inflight, dict(admission.held)
