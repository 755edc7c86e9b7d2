"""The shipped trained tenants change behaviour through the real server; the base model does not.

`examples/tenants/{lower,signature,numbers}` were trained by `nlora-serve adapters tune` to
answer in lower case / to sign with " -- Acme Support" / to write numbers as words
(examples/tenants/README.md). Ten held-out prompts each (never in their training data), greedy,
fp32: each tenant's metric must reach 0.8 and the base model's must not.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from nlora_serve.client import AsyncNloraClient

EXAMPLES = Path(__file__).parents[2] / "examples" / "tenants"


def _styles():
    spec = importlib.util.spec_from_file_location("tenant_styles", EXAMPLES / "styles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lower_share(answers: list[str]) -> float:
    """Share of answers without an upper-case letter, computed here independently of the examples' metric."""
    return sum(a == a.lower() for a in answers) / len(answers)


async def _answers(target: str, adapter: str | None, prompts: list[str], max_tokens: int) -> list[str]:
    async def one(prompt):
        async with AsyncNloraClient(target, timeout=300) as client:
            deltas = [d async for d in client.generate(messages=[{"role": "user", "content": prompt}],
                                                       adapter=adapter, max_tokens=max_tokens, temperature=0.0)]
            return "".join(d.text for d in deltas)
    return await asyncio.gather(*(one(p) for p in prompts))


async def _batch(target: str, jobs: list[tuple[str | None, list[str], int]]) -> list[list[str]]:
    """The answers of every (adapter, prompts, max_tokens) job, all queued at once: the engine
    batches them into one run of steps instead of one run per job."""
    return await asyncio.gather(*(_answers(target, adapter, prompts, n) for adapter, prompts, n in jobs))


def signed_share(answers: list[str]) -> float:
    return sum(a.rstrip().endswith("-- Acme Support") for a in answers) / len(answers)


@pytest.fixture(scope="module")
def server(make_module_server):
    """One server for the module: each test registers adapters of its own names (lower, signature,
    numbers; acme) and leaves it idle."""
    return make_module_server()


def test_trained_tenants_change_behaviour_and_the_base_model_does_not(server):
    prompts = _styles().EVAL_GENERAL[:10]
    assert len(prompts) == 10
    for name in ("lower", "signature", "numbers"):
        server.engine.adapters.register_dir(name, EXAMPLES / name)
    numeric = _styles().EVAL_NUMERIC[:10]
    assert len(numeric) == 10
    # two runs of steps (96, then 48 tokens), each of 20-30 sequences: one run a job took 328 steps
    signed, base = asyncio.run(_batch(server.target, [("signature", prompts, 96), (None, prompts, 96)]))
    lower, in_words, base_numeric = asyncio.run(_batch(server.target, [
        ("lower", prompts, 40), ("numbers", numeric, 48), (None, numeric, 48)]))
    assert lower_share(lower) >= 0.8
    assert signed_share(signed) >= 0.8
    assert lower_share(base) < 0.8 and signed_share(base) < 0.8
    assert digit_free_share(in_words) >= 0.8 and digit_free_share(base_numeric) < 0.8


def digit_free_share(answers: list[str]) -> float:
    return sum(not any(c in "0123456789" for c in a) for a in answers) / len(answers)


def test_adapters_swap_cli_retrains_a_tenant_in_place(server, capsys):
    from nlora_serve.cli import main as cli_main

    server.engine.adapters.register_dir("acme", EXAMPLES / "lower")
    prompt = [_styles().EVAL_GENERAL[0]]
    before = asyncio.run(_answers(server.target, "acme", prompt, 96))[0]
    # The "retrained" N: same family (r=16, all seven projections), another behaviour.
    n_file = EXAMPLES / "signature" / "adapter_model.safetensors"
    assert cli_main(["adapters", "swap", "--server", server.target, "--name", "acme", str(n_file),
                     "--if-version", "1"]) == 0
    assert '"version": 2' in capsys.readouterr().out
    after = asyncio.run(_answers(server.target, "acme", prompt, 96))[0]
    assert before == before.lower() and not before.rstrip().endswith("-- Acme Support")
    assert after != after.lower() and after.rstrip().endswith("-- Acme Support")
