"""``SamplingParams.prompt_logprobs`` over gRPC: the first response scores every prompt token after
the first, against transformers' float64 log_softmax over the prompt (the base model, and the tied
and LoRA tenants on weights merged straight from their files), with ranks and top-k; generated
tokens' ``top_logprobs`` in the client's deltas; the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))  # the merge straight from the files

from adapter_helpers import file_deltas, merged  # noqa: E402
from grpc_harness import ADMIN_KEY, TENANT_KEYS  # noqa: E402
from nlora_serve.client import InvalidArgument, NloraClient  # noqa: E402

CASES = Path(__file__).parents[1] / "data" / "cases"
TOL = 1e-3  # fp32 server against the fp32 model's logits in float64
TENANTS = {"inttune-nystrom-tied": "tied-co", "lora-rslora": "lora-co"}
PROMPT = "Question: what is the capital of France?\nAnswer: The capital of France is Paris."


def rows(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids) - 1, V] float64: row p is log p(. | ids[:p + 1]) under ``model`` (merged with
    ``adapter``'s files when given)."""
    deltas, biases = file_deltas(CASES / adapter) if adapter else ({}, {})
    with merged(model, deltas, biases), torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)


@pytest.fixture(scope="module")
def server(make_module_server, tmp_path_factory):
    from grpc_harness import write_tenants_file

    running = make_module_server(write_tenants_file(tmp_path_factory.mktemp("keys") / "tenants.json"))
    with NloraClient(running.target, api_key=ADMIN_KEY) as admin:
        for name in TENANTS:
            admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)
    return running


@pytest.mark.parametrize("adapter", [None, "inttune-nystrom-tied", "lora-rslora"])
def test_prompt_logprobs_score_every_prompt_token_as_transformers_does(server, tokenizer, hf_model, adapter):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    key = TENANT_KEYS[TENANTS[adapter]] if adapter else TENANT_KEYS["base-co"]
    k = 3
    with NloraClient(server.target, api_key=key, timeout=120) as client:
        _, deltas = client.complete(ids, adapter=adapter, max_tokens=2, min_tokens=2, prompt_logprobs=k,
                                    top_logprobs=2)
    want = rows(hf_model, ids, adapter)
    scored = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(scored) == 1 and scored[0] is deltas[0]  # on the first response only
    entries = scored[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        entry, truth = entries[p], want[p - 1]
        assert entry.token_id == ids[p]
        assert entry.logprob == pytest.approx(float(truth[ids[p]]), abs=TOL), p
        assert entry.rank == 1 + int((truth > truth[ids[p]]).sum()), p
        assert len(entry.top) == k
        best = truth.topk(k)
        for (token, value), want_value in zip(entry.top, best.values.tolist()):
            assert value == pytest.approx(want_value, abs=TOL), p
            assert float(truth[token]) == pytest.approx(want_value, abs=TOL), p  # a tie may swap ids
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    # the generated tokens' own logprobs: the top 2, best first, and the sampled token, a third
    # where min_tokens kept it from EOS (vLLM's k + 1)
    generated = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in generated] == [t for d in deltas for t in d.token_ids]
    for lp in generated:
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert len(lp.top) == (2 if lp.token_id in dict(lp.top[:2]) else 3) and lp.token_id in dict(lp.top), lp
    assert server.engine.stats()["kv_blocks_used"] == 0


def test_a_request_without_prompt_logprobs_gets_none(server, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=120) as client:
        _, deltas = client.complete(ids, max_tokens=2)
    assert all(d.prompt_logprobs is None and d.logprobs == () for d in deltas)


def test_prompt_logprobs_zero_gives_each_token_alone(server, tokenizer, hf_model):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)[:12]
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=120) as client:
        _, deltas = client.complete(ids, max_tokens=1, prompt_logprobs=0)
    want = rows(hf_model, ids, None)
    entries = deltas[0].prompt_logprobs
    assert [e.top for e in entries[1:]] == [()] * (len(ids) - 1)
    assert [e.logprob for e in entries[1:]] == pytest.approx([float(want[p - 1, ids[p]]) for p in range(1, len(ids))],
                                                           abs=TOL)


@pytest.mark.parametrize("field", ["prompt_logprobs", "top_logprobs"])
def test_more_than_twenty_is_refused_naming_the_field(server, field):
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=60) as client:
        with pytest.raises(InvalidArgument, match=f"SamplingParams.{field} must be at most 20; got 21"):
            client.complete("Hello", max_tokens=1, **{field: 21})
