"""The shipped trained tenant changes behaviour through the real server; the base model does not.

`examples/tenants/upper` was trained by `nlora-serve adapters tune` to answer in capitals
(examples/tenants/README.md). Ten held-out prompts (never in its training data), greedy, fp32:
the tenant's share of upper-case letters must reach 0.8 and the base model's must not.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from nlora_serve.client import AsyncNloraClient

EXAMPLES = Path(__file__).parents[2] / "examples" / "tenants"


def _styles():
    spec = importlib.util.spec_from_file_location("tenant_styles", EXAMPLES / "styles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upper_share(text: str) -> float:
    """Upper-case letters / letters, computed here independently of the examples' own metric."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters)


async def _answers(target: str, adapter: str | None, prompts: list[str]) -> list[str]:
    async def one(prompt):
        async with AsyncNloraClient(target, timeout=300) as client:
            deltas = [d async for d in client.generate(messages=[{"role": "user", "content": prompt}],
                                                       adapter=adapter, max_tokens=40, temperature=0.0)]
            return "".join(d.text for d in deltas)
    return await asyncio.gather(*(one(p) for p in prompts))


def test_upper_tenant_answers_in_capitals_and_the_base_model_does_not(make_server):
    prompts = _styles().EVAL_GENERAL[:10]
    assert len(prompts) == 10
    server = make_server()
    server.engine.adapters.register_dir("upper", EXAMPLES / "upper")
    tenant = asyncio.run(_answers(server.target, "upper", prompts))
    base = asyncio.run(_answers(server.target, None, prompts))
    assert upper_share("".join(tenant)) >= 0.8
    assert upper_share("".join(base)) < 0.8
    assert sum(upper_share(a) >= 0.8 for a in tenant) >= 8  # most answers, not one long one
