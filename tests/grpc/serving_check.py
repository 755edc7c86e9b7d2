"""'The server still serves other tenants': a short greedy stream checked against the references."""

from __future__ import annotations

import json
from pathlib import Path

from grpc_harness import matches_reference
from nlora_serve.client import NloraClient

CASES = Path(__file__).parents[1] / "data" / "cases"
TIED = "inttune-nystrom-tied"
CHECK_TOKENS = 6


def still_serves(target: str, adapter: str | None = TIED, api_key: str | None = None) -> None:
    """Stream CHECK_TOKENS greedy tokens on ``adapter`` (None = base) and compare them with the
    recorded transformers reference; raises AssertionError on a mismatch."""
    path = CASES / "BASE_GREEDY.json" if adapter is None else CASES / adapter / "case.json"
    ref = json.loads(path.read_text())["references"][1]
    with NloraClient(target, api_key=api_key, timeout=60) as client:
        _, deltas = client.complete(ref["prompt_token_ids"], adapter=adapter, max_tokens=CHECK_TOKENS,
                                    min_tokens=CHECK_TOKENS)
    tokens = [t for d in deltas for t in d.token_ids]
    assert matches_reference(tokens, ref["greedy_token_ids"][:CHECK_TOKENS],
                             ref["top2_logit_margins"][:CHECK_TOKENS]), (adapter, tokens)
