"""A request id reused at once after a cancel (the class of vllm #23697 / #10583, issue 16).

The engine keys every admitted request by its own internal id, so the second stream with the same
client id gets only its own tokens and ends normally, and the cancelled one is really aborted:
nothing keeps running unread, the ``--max-queue`` bound holds, KV blocks return to zero.
"""

from __future__ import annotations

import time

import pytest

from nlora_serve.client import InvalidArgument, NloraClient

PROMPT = [1, 9690, 198, 2683, 359, 253]
CYCLES = 12


def _settled(engine, timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0) or time.monotonic() > deadline:
            return stats


def test_reused_id_after_cancel_gets_only_its_own_tokens(make_server):
    server = make_server(max_queue=2)
    with NloraClient(server.target, timeout=120) as client:
        # the reference: this prompt's greedy tokens when nothing else runs
        want = [t for d in client.complete(PROMPT, max_tokens=6, min_tokens=6)[1] for t in d.token_ids]
        for cycle in range(CYCLES):
            first = client.generate(PROMPT, request_id="x", max_tokens=400, min_tokens=400)
            for _ in range(3):  # a few tokens, then cancel
                next(first)
            first.close()
            deltas = list(client.generate(PROMPT, request_id="x", max_tokens=6, min_tokens=6))
            got = [t for d in deltas for t in d.token_ids]
            assert got == want, f"cycle {cycle}: the second stream got {got}, alone it makes {want}"
            assert deltas[-1].finish_reason == "length" and deltas[-1].request_id == "x"
            assert deltas[-1].usage.completion_tokens == 6
            stats = _settled(server.engine)  # the cancelled generation is gone, not running unread
            assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), (cycle, stats)
    stats = _settled(server.engine)
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), stats


def test_an_overlong_request_id_is_refused_and_the_server_serves_on(make_server):
    # every streamed message echoes the id: a 1 MB id was sent back with each token before
    server = make_server()
    with NloraClient(server.target, timeout=120) as client:
        with pytest.raises(InvalidArgument) as err:
            list(client.generate(PROMPT, request_id="x" * (1 << 20), max_tokens=2))
        assert "GenerateRequest.request_id must be at most 256 characters; got 1048576" in str(err.value)
        deltas = list(client.generate(PROMPT, request_id="y" * 256, max_tokens=2, min_tokens=2))
        assert deltas[-1].request_id == "y" * 256 and deltas[-1].usage.completion_tokens == 2
