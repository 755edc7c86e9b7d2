"""100 hot-swaps of one tied tenant's N under concurrent streams: nothing fails, every request
runs entirely on one version, the one current when it was admitted (DESIGN §3, §9)."""

from __future__ import annotations

import asyncio
import time

import safetensors.torch
import torch

from nlora_serve.client import AsyncNloraClient, NloraClient
from serving_check import CASES, TIED, still_serves

NUM_SWAPS = 100
NUM_STREAMS = 8
SWAP_GAP_S = 0.02  # spread the swaps over several request lifetimes
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646]


def _payloads(server) -> list[bytes]:
    """NUM_SWAPS distinct N-only safetensors files: the stored N scaled by 1 + i/100."""
    stored = server.engine.adapters.registry.get(TIED).path / "adapter_model.safetensors"
    n = safetensors.torch.load_file(stored)
    assert n and all(k.endswith("lora_N.weight") for k in n)
    return [safetensors.torch.save({k: (t * (1 + (i + 1) / 100)).contiguous() for k, t in n.items()})
            for i in range(NUM_SWAPS)]


async def _load(target: str, payloads: list[bytes]):
    swaps: list[tuple[float, float, int, str]] = []  # (sent, acknowledged, version, content hash)
    requests: list[tuple[float, float, set, str | None]] = []  # (sent, first delta, {(version, hash)}, finish)
    done = asyncio.Event()

    async def stream(client):
        while not done.is_set():
            sent, first, refs = time.perf_counter(), None, set()
            async for d in client.generate(PROMPT, adapter=TIED, max_tokens=4, ignore_eos=True):
                first = first or time.perf_counter()
                refs.add((d.adapter_version, d.content_hash))
            requests.append((sent, first, refs, d.finish_reason))

    async def swapper(client):
        await asyncio.sleep(0.2)  # let the streams fill the batch first
        for payload in payloads:
            sent = time.perf_counter()
            info = await client.swap_adapter(TIED, payload)
            swaps.append((sent, time.perf_counter(), info.version, info.content_hash))
            await asyncio.sleep(SWAP_GAP_S)
        while len(requests) < 2 * NUM_STREAMS:  # a loaded machine finishes fewer during the swaps
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        done.set()

    async with AsyncNloraClient(target, timeout=120) as client:
        await asyncio.gather(swapper(client), *(stream(client) for _ in range(NUM_STREAMS)))
    return swaps, requests


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    return float(ordered.quantile(0.5)), float(ordered.quantile(0.99))


def test_hundred_swaps_under_load_each_request_on_one_admitted_version(make_server):
    server = make_server()
    with NloraClient(server.target) as admin:
        first = admin.upload_adapter(TIED, CASES / TIED)
    swaps, requests = asyncio.run(_load(server.target, _payloads(server)))

    assert [v for _, _, v, _ in swaps] == list(range(2, NUM_SWAPS + 2))
    hashes = {first.version: first.content_hash, **{v: h for _, _, v, h in swaps}}
    assert len(set(hashes.values())) == NUM_SWAPS + 1  # every swap really changed N
    assert len(requests) >= 2 * NUM_STREAMS and all(reason == "length" for *_, reason in requests)
    for sent, first_delta, refs, _ in requests:
        assert len(refs) == 1, refs  # one version for the whole request
        (version, content_hash), = refs
        assert hashes[version] == content_hash
        # admitted between sending and the first token: the current version then is at least the
        # newest one acknowledged before sending, at most the newest one requested before the token
        lowest = max([v for _, ack, v, _ in swaps if ack < sent], default=first.version)
        highest = max([v for s, _, v, _ in swaps if s < first_delta], default=first.version)
        assert lowest <= version <= highest, (lowest, version, highest)
    # requests were admitted at many points of the swap sequence (one admission point per step)
    assert len({next(iter(refs))[0] for _, _, refs, _ in requests}) >= 5

    server_p50, server_p99 = _percentiles(list(server.server.admin.swap_seconds))
    rtt_p50, rtt_p99 = _percentiles([ack - sent for sent, ack, _, _ in swaps])
    print(f"\nswap latency under load ({NUM_STREAMS} streams, {len(requests)} requests): "
          f"server receipt->admitted p50 {server_p50 * 1e3:.1f} ms, p99 {server_p99 * 1e3:.1f} ms; "
          f"client round trip p50 {rtt_p50 * 1e3:.1f} ms, p99 {rtt_p99 * 1e3:.1f} ms")
    registry = server.engine.adapters.registry
    assert registry.get(TIED).version == NUM_SWAPS + 1 and registry.get(TIED).refcount == 0
    assert registry.get(TIED).pool.used == 1  # every superseded version gave its slot back
    still_serves(server.target, adapter=None)
