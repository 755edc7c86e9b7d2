"""The vLLM-cpu prompt-scoring gate (engine/vllm_backend/scoring_gate.py), without vLLM: a request
that scores its prompt enters only when none runs, holds back newcomers while it waits, and runs
alone until its first output; a second scorer waits until the first has left; a scorer cancelled
while waiting holds back nobody."""

from __future__ import annotations

import asyncio

from nlora_serve.engine.vllm_backend.scoring_gate import ScoringGate


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_scoring_runs_alone_and_is_not_starved():
    async def run() -> list[str]:
        gate, order = ScoringGate(), []

        async def request(name: str, scores: bool) -> None:
            await gate.enter(scores)
            order.append(name)

        await request("a", False)
        await request("b", False)  # plain requests run together
        scorer = asyncio.create_task(request("s", True))
        await _settle()
        late = asyncio.create_task(request("c", False))  # behind the waiting scorer
        await _settle()
        assert order == ["a", "b"]
        await gate.leave(False)
        await _settle()
        assert order == ["a", "b"]  # b still runs
        await gate.leave(False)
        await _settle()
        assert order == ["a", "b", "s"]  # alone now; c waits for its prompt to be scored
        second = asyncio.create_task(request("t", True))
        await gate.scored()
        await _settle()
        assert order == ["a", "b", "s"]  # the second scorer holds c back, and waits for s to leave
        await gate.leave(False)
        await _settle()
        assert order == ["a", "b", "s", "t"]
        await gate.leave(True)  # t ended before its first output
        await _settle()
        await asyncio.gather(scorer, late, second)
        return order

    assert asyncio.run(run()) == ["a", "b", "s", "t", "c"]


def test_a_scorer_cancelled_while_waiting_holds_back_nobody():
    async def run() -> bool:
        gate = ScoringGate()
        await gate.enter(False)
        scorer = asyncio.create_task(gate.enter(True))
        await _settle()
        scorer.cancel()
        await _settle()
        await asyncio.wait_for(gate.enter(False), 1)
        return scorer.cancelled()

    assert asyncio.run(run())
